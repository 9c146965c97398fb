"""The single-file executable (``python -m tornado_rt.build``, PyInstaller ``--onefile``), built once
and run from an empty directory with an environment that has no Python at all: ``serve --dev``
starts, a WebSocket client authenticates, subscribes (the built-in plugins are inside) and
receives a message published over the HTTP API; /metrics (prometheus-client) answers; the Redis
broker works against a real redis-server. Slow (about a minute): marked ``build``."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from redis_fixtures import RedisProcess, require_redis_binary
from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient, make_token

pytestmark = pytest.mark.build


def python_free_env(home):
    """Nothing of a Python installation: PATH is an empty directory, no PYTHON* variables."""
    empty_bin = home / "bin"
    empty_bin.mkdir(exist_ok=True)
    return {"PATH": str(empty_bin), "HOME": str(home), "TMPDIR": str(home), "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def executable(tmp_path_factory):
    """``python -m tornado_rt.build`` into a temporary dist directory, then copied alone into an
    otherwise empty directory."""
    dist = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "tornado_rt.build", "--executable", "--dist", str(dist)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stderr, result.stderr  # e.g. a hidden import PyInstaller did not find
    edge = tmp_path_factory.mktemp("edge-box")
    target = edge / "tornado-rt"
    shutil.copy2(dist / "tornado-rt", target)
    return target


@pytest.fixture
def edge_env(executable, tmp_path, monkeypatch):
    monkeypatch.chdir(executable.parent)  # started from the directory holding nothing but it
    return python_free_env(tmp_path)


def run(executable, env, *args):
    return subprocess.run([str(executable), *args], env=env, capture_output=True, text=True, timeout=60,
                          cwd=executable.parent, stdin=subprocess.DEVNULL)


def test_the_executable_answers_version_and_help_without_python(executable, edge_env):
    from tornado_rt import __version__

    assert shutil.which("python3", path=edge_env["PATH"]) is None and "PYTHONPATH" not in edge_env
    version = run(executable, edge_env, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"tornado-rt {__version__}", version
    help_ = run(executable, edge_env, "serve", "--help")
    assert help_.returncode == 0 and "--trusted-proxy" in help_.stdout and "--tls-cert" in help_.stdout, help_
    # The catalogue of the built-in plugins, the same as the installed package's.
    frozen = run(executable, edge_env, "types", "--json")
    assert frozen.returncode == 0, frozen
    installed = subprocess.run([sys.executable, "-m", "tornado_rt", "types", "--json"], capture_output=True,
                               text=True, timeout=60)
    assert installed.returncode == 0, installed
    catalogue = json.loads(frozen.stdout)
    assert catalogue == json.loads(installed.stdout)
    assert {t["plugin"] for t in catalogue["message_types"]} == {"core", "database", "premium"}
    assert "table" in {p["page"] for p in catalogue["page_types"]}
    table = run(executable, edge_env, "types")
    assert table.returncode == 0 and "rows_created" in table.stdout and "database" in table.stdout, table
    refused = run(executable, edge_env, "serve", "--port", "0")
    assert refused.returncode == 2 and refused.stderr.startswith("tornado-rt: error: --jwt-secret:"), refused


@pytest.mark.gen_test(timeout=60)
async def test_the_executable_serves_a_websocket_session_without_python(executable, edge_env):
    proc = ServeProcess(["serve", "--dev", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY],
                        env=edge_env, argv0=str(executable))
    try:
        client = await WsClient.connect(proc.ws_url, make_token(1))
        await client.subscribe("table", table_id=1)  # page type of the built-in database plugin
        message = {"type": "rows_created", "table_id": 1, "rows": [{"id": 7, "name": "edge"}], "metadata": {},
                   "before_row_id": None}
        api = Api(proc.base)
        assert await api.publish({"message": message}) == {"published": 1, "delivered": 1}
        assert await client.recv() == message
        status, text, _ = await api.call("GET", "/metrics", key=None)
        assert status == 200 and "tornado_rt_" in text
        client.close()
    finally:
        assert await proc.stopped() == 0, proc.output()
    assert "Traceback" not in proc.stderr(), proc.output()


@pytest.mark.gen_test(timeout=60)
async def test_the_executable_holds_the_redis_broker(executable, edge_env):
    redis = RedisProcess(require_redis_binary()).start()
    one = two = None
    try:
        args = ["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY, "--broker", redis.url]
        one = ServeProcess(args, env=edge_env, argv0=str(executable))
        two = ServeProcess(args, env=edge_env, argv0=str(executable))
        client = await WsClient.connect(two.ws_url, make_token(1))
        message = {"type": "user_data_updated", "user_data": {"from": "the other process"}}
        assert await Api(one.base).publish({"message": message, "to": {"all_users": True}}) == {"published": 1, "delivered": 0}
        assert await client.recv() == message
        client.close()
    finally:
        for proc in (one, two):
            if proc is not None:
                assert await proc.stopped() == 0, proc.output()
        redis.kill()


@pytest.mark.gen_test(timeout=240)
async def test_the_zipapp_serves_with_a_plain_python(tmp_path):
    """``--zipapp``: dist/tornado-rt.pyz run by the base interpreter (not this virtualenv), with
    no PYTHONPATH: it carries tornado-rt and its dependencies itself."""
    from tornado.ioloop import IOLoop

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dist = tmp_path / "dist"
    result = await IOLoop.current().run_in_executor(None, lambda: subprocess.run(
        [sys.executable, "-m", "tornado_rt.build", "--zipapp", "--dist", str(dist), "--source", repo],
        capture_output=True, text=True, timeout=200))
    assert result.returncode == 0, result.stdout + result.stderr
    pyz = dist / "tornado-rt.pyz"
    base_python = getattr(sys, "_base_executable", sys.executable)
    env = {**python_free_env(tmp_path), "SHIV_ROOT": str(tmp_path / "shiv")}
    proc = ServeProcess([str(pyz), "serve", "--dev", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY],
                        env=env, argv0=base_python)
    try:
        client = await WsClient.connect(proc.ws_url, make_token(1))
        await client.subscribe("table", table_id=1)
        message = {"type": "rows_created", "table_id": 1, "rows": [{"id": 1}], "metadata": {}, "before_row_id": None}
        assert await Api(proc.base).publish({"message": message}) == {"published": 1, "delivered": 1}
        assert await client.recv() == message
        client.close()
    finally:
        assert await proc.stopped() == 0, proc.output()
    assert any((tmp_path / "shiv").iterdir())  # its dependencies were unpacked there, not found elsewhere
