"""``tornado-rt serve``: options, precedence, refusals, --dev, start-up line, signals, the Origin
allow-list and log redaction — against real subprocesses."""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import pytest
from tornado.httpclient import HTTPClientError
from tornado.ioloop import IOLoop

from redis_fixtures import RedisProcess, require_redis_binary
from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient, clean_env, make_token, run_cli
from tornado_rt import cli

BASE = ["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY]

# The command line table of docs/server-api.md (kept here, not derived from the code under test).
SPEC_OPTIONS = [
    ("--host", "TORNADO_RT_HOST"), ("--port", "TORNADO_RT_PORT"), ("--jwt-secret", "TORNADO_RT_JWT_SECRET"),
    ("--jwt-public-key", "TORNADO_RT_JWT_PUBLIC_KEY"), ("--jwt-algorithm", "TORNADO_RT_JWT_ALGORITHMS"),
    ("--jwt-user-claim", "TORNADO_RT_JWT_USER_CLAIM"), ("--api-key", "TORNADO_RT_API_KEYS"),
    ("--allowed-origin", "TORNADO_RT_ALLOWED_ORIGINS"), ("--no-anonymous", "TORNADO_RT_NO_ANONYMOUS"),
    ("--config", "TORNADO_RT_CONFIG"), ("--broker", "TORNADO_RT_BROKER"), ("--log-level", "TORNADO_RT_LOG_LEVEL"),
    ("--dev", None),
]


def console_script():
    path = Path(sys.executable).with_name("tornado-rt")
    return str(path) if path.exists() else shutil.which("tornado-rt")


# --- help and entry points ------------------------------------------------------------------------

def test_help_documents_every_option():
    script = console_script()
    assert script, "the tornado-rt console script is not installed"
    result = subprocess.run([script, "serve", "--help"], capture_output=True, text=True, timeout=30,
                            env=clean_env())
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for flag, env in SPEC_OPTIONS:
        assert flag in text, flag
        if env:
            assert env in text, env
    for option in cli.OPTIONS:  # the extra ones too
        assert option.flag in text
        if option.env_var:
            assert option.env_var in text
    assert "command line > environment > config file > default" in " ".join(text.split())


def test_python_m_without_a_command_shows_usage_and_exits_2():
    result = run_cli([])
    assert result.returncode == 2
    assert "serve" in result.stderr and "Traceback" not in result.stderr


# --- precedence -------------------------------------------------------------------------------------

def resolve(argv, env=None):
    return cli.resolve(cli.build_parser().parse_args(["serve", *argv]), env or {})


def test_defaults():
    config = resolve(["--jwt-secret", "s", "--api-key", "k"])
    assert config.host == "127.0.0.1" and config.port == 8000
    assert config.jwt_algorithms == ["HS256"] and config.jwt_user_claim == "user_id"
    assert config.allowed_origins is None and config.no_anonymous is False
    assert config.broker is None and config.log_level == "info"
    assert config.max_body_size == 10 * 1024 * 1024 and config.no_metrics is False
    settings = cli.settings(config)
    assert settings.allowed_origins is None and settings.allow_anonymous is True


def test_precedence_cli_over_env_over_config_over_default(tmp_path):
    config_file = tmp_path / "rt.toml"
    config_file.write_text(
        'host = "10.0.0.1"\nport = 7001\njwt_secret = "cfg-secret"\napi_keys = ["cfg-key"]\n'
        'jwt_algorithms = ["HS384"]\nallowed_origins = ["https://cfg.example"]\nno_anonymous = true\n'
        'log_level = "error"\njwt_user_claim = "cfg_claim"\nmax_body_size = 1000\n')
    env = {"TORNADO_RT_CONFIG": str(config_file), "TORNADO_RT_PORT": "7002", "TORNADO_RT_API_KEYS": "env-1, env-2",
           "TORNADO_RT_JWT_ALGORITHMS": "HS512,HS256", "TORNADO_RT_LOG_LEVEL": "warning",
           "TORNADO_RT_NO_ANONYMOUS": "false", "TORNADO_RT_JWT_USER_CLAIM": ""}
    config = resolve(["--port", "7003", "--api-key", "cli-key", "--allowed-origin", "https://cli.example",
                      "--allowed-origin", "*"], env)
    # command line wins
    assert config.port == 7003 and config.api_keys == ["cli-key"]
    assert config.allowed_origins == ["https://cli.example", "*"]
    # then the environment (an empty variable counts as unset)
    assert config.jwt_algorithms == ["HS512", "HS256"] and config.log_level == "warning"
    assert config.no_anonymous is False
    # then the config file
    assert config.host == "10.0.0.1" and config.jwt_secret == "cfg-secret"
    assert config.jwt_user_claim == "cfg_claim" and config.max_body_size == 1000
    assert config.sources["jwt_secret"] == f"jwt_secret in {config_file}"
    # then the defaults
    assert config.path_prefix == "/ws/core/" and config.broker is None

    without_cli = resolve([], env)
    assert without_cli.port == 7002 and without_cli.api_keys == ["env-1", "env-2"]
    assert without_cli.allowed_origins == ["https://cfg.example"]
    only_file = resolve(["--config", str(config_file)])
    assert only_file.port == 7001 and only_file.api_keys == ["cfg-key"] and only_file.no_anonymous is True
    # --config beats TORNADO_RT_CONFIG
    other = tmp_path / "other.toml"
    other.write_text('jwt_secret = "s"\napi_keys = ["other"]\n')
    assert resolve(["--config", str(other)], {"TORNADO_RT_CONFIG": str(config_file)}).api_keys == ["other"]


@pytest.mark.gen_test(timeout=30)
async def test_precedence_on_a_running_server(tmp_path):
    """The key a running server accepts follows the precedence: flag, then env, then file."""
    config_file = tmp_path / "rt.toml"
    config_file.write_text(f'jwt_secret = "{SECRET}"\napi_keys = ["cfg-key"]\nport = 0\n')
    env = clean_env(TORNADO_RT_CONFIG=str(config_file))
    cases = [
        (["serve", "--api-key", "cli-key"], dict(env, TORNADO_RT_API_KEYS="env-key"), "cli-key"),
        (["serve"], dict(env, TORNADO_RT_API_KEYS="env-key"), "env-key"),
        (["serve"], env, "cfg-key"),
    ]
    for args, environ, accepted in cases:
        proc = ServeProcess(args, env=environ)
        try:
            for key in ("cli-key", "env-key", "cfg-key"):
                status, _, _ = await Api(proc.base, key).call("GET", "/api/stats")
                assert status == (200 if key == accepted else 401), (args, key, status)
        finally:
            assert await proc.stopped() == 0, proc.output()


# --- refusals ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def refusal_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("refusals")
    (d / "bad.toml").write_text('port = \n[[[')
    (d / "unknown_key.toml").write_text('jwt_secret = "s"\napi_keys = ["k"]\napi_key = "typo"\n')
    (d / "wrong_type.toml").write_text('jwt_secret = "s"\napi_keys = ["k"]\nport = "eighty"\n')
    (d / "not_a_key.pem").write_text("this is not a PEM public key\n")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    yield d, busy.getsockname()[1]
    busy.close()


def refusal_cases(d, busy_port):
    base = ["serve", "--port", "0"]
    keys = ["--jwt-secret", "s", "--api-key", "k"]
    return [
        # (id, args, extra env, text the single stderr line must contain)
        ("no-jwt-key", base + ["--api-key", "k"], {}, "--jwt-secret"),
        ("no-api-key", base + ["--jwt-secret", "s"], {}, "--api-key"),
        ("no-keys-at-all", base, {}, "--jwt-secret"),
        ("port-too-big", ["serve", "--port", "70000", *keys], {}, "--port"),
        ("port-negative", ["serve", "--port=-1", *keys], {}, "--port"),
        ("port-not-a-number", ["serve", "--port", "http", *keys], {}, "--port"),
        ("port-from-env", ["serve", *keys], {"TORNADO_RT_PORT": "abc"}, "TORNADO_RT_PORT"),
        ("port-in-use", ["serve", "--port", str(busy_port), *keys], {}, "--port"),
        ("bad-host", ["serve", "--port", "0", "--host", "no-such-host.invalid", *keys], {}, "--host"),
        ("key-file-missing", base + ["--api-key", "k", "--jwt-algorithm", "RS256", "--jwt-public-key",
                                     str(d / "missing.pem")], {}, "--jwt-public-key"),
        ("key-file-not-pem", base + ["--api-key", "k", "--jwt-algorithm", "RS256", "--jwt-public-key",
                                     str(d / "not_a_key.pem")], {}, "--jwt-public-key"),
        ("key-file-is-a-directory", base + ["--api-key", "k", "--jwt-algorithm", "ES256", "--jwt-public-key",
                                            str(d)], {}, "--jwt-public-key"),
        ("asymmetric-without-key", base + ["--api-key", "k", "--jwt-algorithm", "RS256"], {}, "--jwt-public-key"),
        ("unknown-algorithm", base + [*keys, "--jwt-algorithm", "HS999"], {}, "--jwt-algorithm"),
        ("algorithm-none", base + [*keys, "--jwt-algorithm", "none"], {}, "--jwt-algorithm"),
        ("algorithm-from-env", base + keys, {"TORNADO_RT_JWT_ALGORITHMS": "HS256,XX1"}, "TORNADO_RT_JWT_ALGORITHMS"),
        ("bad-toml", base + ["--config", str(d / "bad.toml")], {}, "--config"),
        ("bad-toml-from-env", base, {"TORNADO_RT_CONFIG": str(d / "bad.toml")}, "TORNADO_RT_CONFIG"),
        ("missing-toml", base + ["--config", str(d / "nope.toml")], {}, "--config"),
        ("unknown-toml-key", base + ["--config", str(d / "unknown_key.toml")], {}, "api_key"),
        ("wrong-toml-type", ["serve", "--config", str(d / "wrong_type.toml")], {}, "--port"),
        ("bad-broker-scheme", base + [*keys, "--broker", "amqp://127.0.0.1/"], {}, "--broker"),
        ("bad-broker-port", base + [*keys, "--broker", "redis://127.0.0.1:http/0"], {}, "--broker"),
        ("broker-from-env", base + keys, {"TORNADO_RT_BROKER": "nonsense"}, "TORNADO_RT_BROKER"),
        ("bad-log-level", base + [*keys, "--log-level", "loud"], {}, "--log-level"),
        ("bad-boolean-env", base + keys, {"TORNADO_RT_NO_ANONYMOUS": "maybe"}, "TORNADO_RT_NO_ANONYMOUS"),
        ("bad-origin", base + [*keys, "--allowed-origin", "example.com"], {}, "--allowed-origin"),
        ("bad-limit", base + [*keys, "--max-body-size", "0"], {}, "--max-body-size"),
        ("bad-path-prefix", base + [*keys, "--path-prefix", "ws"], {}, "--path-prefix"),
        ("unknown-option", base + [*keys, "--no-such-option"], {}, "--no-such-option"),
        ("missing-value", ["serve", "--port"], {}, "--port"),
    ]


@pytest.fixture(scope="module")
def refusals(refusal_files):
    """Run every refusal case (independent processes, a few at a time)."""
    d, busy_port = refusal_files
    cases = refusal_cases(d, busy_port)

    def run(case):
        try:
            result = run_cli(case[1], env=clean_env(**case[2]), timeout=30)
        except subprocess.TimeoutExpired as exc:
            return case[0], (case, None, exc.stdout or "", exc.stderr or "")
        return case[0], (case, result.returncode, result.stdout, result.stderr)

    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        return dict(pool.map(run, cases))


REFUSAL_IDS = [c[0] for c in refusal_cases(Path("/x"), 1)]


@pytest.mark.parametrize("case_id", REFUSAL_IDS)
def test_refusal_is_one_line_naming_the_option_with_exit_2(refusals, case_id):
    (_, args, env, needle), code, out, err = refusals[case_id]
    assert code == 2, (args, code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tornado-rt") and "error" in lines[0], lines[0]
    assert needle in lines[0], lines[0]
    assert "tornado-rt listening" not in out


def test_broker_url_without_the_redis_broker_module_or_extra_is_refused_clearly():
    """The Redis broker is imported lazily; when it cannot be used the refusal says why."""
    code = ("import sys; sys.modules['redis'] = None; from tornado_rt import cli; "
            f"sys.exit(cli.main(['serve', '--port', '0', '--jwt-secret', 's', '--api-key', 'k', "
            f"'--broker', 'redis://127.0.0.1:1/0']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=clean_env())
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--broker" in lines[0], result.stderr
    assert "redis" in lines[0].lower() and "Traceback" not in result.stderr


# --- --dev ------------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_dev_mode_prints_a_working_setup():
    proc = ServeProcess(["serve", "--dev", "--port", "0"])
    try:
        out = proc.stdout()
        secret = _after(out, "JWT secret (generated):")
        api_key = _after(out, "API key (generated):")
        token = _after(out, "JWT for user 1 (valid 24 h):")
        assert jwt.decode(token, secret, algorithms=["HS256"])["user_id"] == 1
        curl_line = next(line.strip() for line in out.splitlines() if line.strip().startswith("curl "))
        assert f"{proc.base}api/publish" in curl_line

        client = await WsClient.connect(proc.ws_url, token=token)
        await client.subscribe("table", table_id=1)  # the demo directory lets user 1 see table 1
        argv = shlex.split(curl_line)
        if shutil.which("curl"):
            result = await IOLoop.current().run_in_executor(
                None, lambda: subprocess.run(argv, capture_output=True, text=True, timeout=20))
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout) == {"published": 1, "delivered": 1}
        else:  # replay the same request without curl
            body = json.loads(argv[argv.index("-d") + 1])
            assert await Api(proc.base, api_key).publish(body) == {"published": 1, "delivered": 1}
        got = await client.recv()
        assert got["type"] == "rows_created" and got["table_id"] == 1
        snippet = next(line for line in out.splitlines() if "new WebSocket(" in line)
        assert proc.ws_url + "?jwt_token=" + token in snippet and "table_id: 1" in snippet
        client.close()
    finally:
        assert await proc.stopped(signal.SIGINT) == 0, proc.output()


def _after(text, label):
    for line in text.splitlines():
        if label in line:
            return line.split(label, 1)[1].strip()
    raise AssertionError(f"{label!r} not printed:\n{text}")


@pytest.mark.gen_test(timeout=30)
async def test_dev_mode_keeps_given_keys_secret():
    proc = ServeProcess(["serve", "--dev", "--port", "0"],
                        env=clean_env(TORNADO_RT_JWT_SECRET=SECRET, TORNADO_RT_API_KEYS=API_KEY))
    try:
        out = proc.stdout()
        assert SECRET not in out and "(generated)" not in out
        token = _after(out, "JWT for user 1 (valid 24 h):")
        assert jwt.decode(token, SECRET, algorithms=["HS256"])["user_id"] == 1
        assert await Api(proc.base).ok("GET", "/api/stats")
    finally:
        assert await proc.stopped() == 0, proc.output()


# --- start-up line, signals -------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_websockets_with_1001_and_exits_0(signum):
    proc = ServeProcess(BASE + ["--log-level", "warning"], argv0=console_script())
    assert proc.port != 0
    assert proc.ws_url == f"ws://127.0.0.1:{proc.port}/ws/core/"
    assert proc.http_url == f"http://127.0.0.1:{proc.port}/api/"
    api = Api(proc.base)
    await api.ok("PUT", "/api/directory", {"workspaces": {"1": [1]}, "tables": {"1": 1}})
    a = await WsClient.connect(proc.ws_url, user_id=1)
    b = await WsClient.connect(proc.ws_url, token="anonymous")
    await a.subscribe("table", table_id=1)
    message = {"type": "rows_created", "table_id": 1, "rows": [], "metadata": {}, "before_row_id": None}
    await api.publish({"message": message})
    proc.proc.send_signal(signum)
    assert await a.recv() == message  # published before the signal: flushed before the close
    assert await a.closed() == 1001
    assert await b.closed() == 1001
    code = await IOLoop.current().run_in_executor(None, lambda: proc.proc.wait(timeout=20))
    assert code == 0, proc.output()
    assert "Traceback" not in proc.stderr()
    with pytest.raises(ConnectionRefusedError):  # it stopped accepting
        await WsClient.connect(proc.ws_url, user_id=1)


# --- WebSocket Origin allow-list ----------------------------------------------------------------------

async def origin_allowed(ws_url, origin, headers=None):
    try:
        client = await WsClient.connect(ws_url, user_id=1, headers={"Origin": origin, **(headers or {})})
    except HTTPClientError as exc:
        assert exc.code == 403, exc
        return False
    client.close()
    return True


@pytest.mark.gen_test(timeout=30)
async def test_origin_allow_list():
    default = ServeProcess(BASE)
    listed = ServeProcess(BASE, env=clean_env(TORNADO_RT_ALLOWED_ORIGINS="https://app.example, https://b.example"))
    anything = ServeProcess(BASE + ["--allowed-origin", "*"])
    try:
        same_host = f"http://127.0.0.1:{default.port}"
        assert await origin_allowed(default.ws_url, same_host)
        assert not await origin_allowed(default.ws_url, "https://evil.example")
        assert not await origin_allowed(default.ws_url, f"http://127.0.0.1:{default.port + 1}")

        assert await origin_allowed(listed.ws_url, "https://app.example")
        assert await origin_allowed(listed.ws_url, "https://B.example/")
        assert not await origin_allowed(listed.ws_url, "https://evil.example")
        assert not await origin_allowed(listed.ws_url, "https://evil.example", {"Sec-Fetch-Site": "cross-site"})
        # a page served by the server's own host is same-origin: Tornado always lets it in
        assert await origin_allowed(listed.ws_url, f"http://127.0.0.1:{listed.port}")

        assert await origin_allowed(anything.ws_url, "https://evil.example")
    finally:
        for proc in (default, listed, anything):
            assert await proc.stopped() == 0, proc.output()


@pytest.mark.gen_test(timeout=30)
async def test_no_anonymous():
    proc = ServeProcess(BASE + ["--no-anonymous"])
    try:
        from tornado.websocket import websocket_connect
        conn = await websocket_connect(f"{proc.ws_url}?jwt_token=anonymous")
        assert json.loads(await conn.read_message()) == {"type": "authentication", "success": False,
                                                         "web_socket_id": None}
        assert await conn.read_message() is None and conn.close_code == 4001
    finally:
        assert await proc.stopped() == 0, proc.output()


# --- logs never hold a credential ---------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_logs_never_contain_a_jwt_or_an_api_key():
    wrong_key = "wrong-key-that-must-not-be-logged-42"
    proc = ServeProcess(["serve", "--port", "0", "--log-level", "debug"],
                        env=clean_env(TORNADO_RT_JWT_SECRET=SECRET, TORNADO_RT_API_KEYS=API_KEY))
    token = make_token(1)
    bad_token = make_token(1, secret="another-secret-of-sufficient-length-xx")
    try:
        api = Api(proc.base)
        client = await WsClient.connect(proc.ws_url, token=token)
        await api.publish({"message": {"type": "user_data_updated", "user_data": {}}, "to": {"all_users": True}})
        await client.recv()
        await Api(proc.base, wrong_key).call("GET", "/api/stats")
        await api.call("GET", f"/api/nope?jwt_token={token}&api_key={API_KEY}")
        await api.call("POST", f"/ws/core/?jwt_token={token}", {})
        from tornado.websocket import websocket_connect
        refused = await websocket_connect(f"{proc.ws_url}?jwt_token={bad_token}")
        assert json.loads(await refused.read_message())["success"] is False
        client.close()
    finally:
        assert await proc.stopped() == 0, proc.output()
    logs = proc.stderr() + proc.stdout()
    assert "tornado.access" in logs and "POST /api/publish" in logs and "jwt_token=[redacted]" in logs
    for secret in (token, bad_token, API_KEY, wrong_key, SECRET):
        assert secret not in logs


# --- --broker redis:// (when redis-server is installed) --------------------------------------------

@pytest.fixture
def redis_url():
    # Skipped without redis-server only outside CI; in CI a missing redis-server is a failure.
    server = RedisProcess(require_redis_binary()).start()
    yield server.url
    server.kill()


@pytest.mark.gen_test(timeout=30)
async def test_two_servers_share_a_redis_broker(redis_url):
    one = ServeProcess(BASE + ["--broker", redis_url])
    two = ServeProcess(BASE, env=clean_env(TORNADO_RT_BROKER=redis_url))
    try:
        for proc in (one, two):
            await Api(proc.base).ok("PUT", "/api/directory", {"workspaces": {"1": [1]}, "tables": {"1": 1}})
        here = await WsClient.connect(one.ws_url, user_id=1, name="on server one")
        there = await WsClient.connect(two.ws_url, user_id=1, name="on server two")
        for client in (here, there):
            await client.subscribe("table", table_id=1)
        message = {"type": "rows_created", "table_id": 1, "rows": [], "metadata": {}, "before_row_id": None}
        # delivered counts this process's connections only: "there" gets it from server two
        assert await Api(one.base).publish({"message": message}) == {"published": 1, "delivered": 1}
        assert await here.recv() == message
        assert await there.recv() == message
        await Api(two.base).barrier(here, there)
    finally:
        for proc in (one, two):
            assert await proc.stopped() == 0, proc.output()
