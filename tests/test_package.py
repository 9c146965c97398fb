"""Ready for the package index: ``python -m build`` (one run: the sdist, then the wheel built from
that sdist, so the sdist is complete) gives metadata with project URLs and an SPDX licence
expression, ``py.typed``, an sdist with docs/, examples/ and deploy/, and a wheel that installs
into a fresh virtualenv and serves ``tornado-rt serve --dev``. Slow (a build and an install):
marked ``build``."""
import email
import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient, clean_env, make_token
from tornado_rt import __version__

pytestmark = pytest.mark.build
REPO = Path(__file__).resolve().parent.parent


def tracked(directory):
    """The files under ``directory`` of this checkout (without bytecode caches, and without
    bench/results/, where a benchmark run writes its output)."""
    found = []
    for root, dirs, files in os.walk(REPO / directory):
        dirs[:] = [d for d in dirs if d != "__pycache__" and (directory, d) != ("bench", "results")]
        found += [os.path.relpath(os.path.join(root, f), REPO) for f in files if not f.endswith(".pyc")]
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "License classifiers are deprecated" not in result.stdout + result.stderr
    wheels = list(out.glob("*.whl"))
    sdists = list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return wheels[0], sdists[0]


def test_wheel_metadata(built):
    wheel, _ = built
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = email.message_from_string(zf.read(f"tornado_rt-{__version__}.dist-info/METADATA").decode())
        entry_points = zf.read(f"tornado_rt-{__version__}.dist-info/entry_points.txt").decode()
    assert metadata["Version"] == __version__
    assert metadata["License-Expression"] == "MIT"
    assert not [c for c in metadata.get_all("Classifier") or [] if c.startswith("License ::")]
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert {"Homepage", "Source", "Issues", "Changelog"} <= set(urls)
    assert all(u.startswith("https://github.com/tornado-rt/tornado-rt") for u in urls.values()), urls
    assert "tornado_rt/py.typed" in names
    assert any(n.startswith("tornado_rt_plugins/") for n in names)
    assert "tornado-rt = tornado_rt.cli:main" in entry_points and "core = tornado_rt_plugins.core:plugin" in entry_points
    assert "build" in (metadata.get_all("Provides-Extra") or [])


def test_sdist_holds_docs_examples_deploy_and_bench(built):
    _, sdist = built
    root = f"tornado_rt-{__version__}/"
    with tarfile.open(sdist) as tf:
        names = {name[len(root):] for name in tf.getnames() if name.startswith(root)}
    for name in ("CHANGELOG.md", "LICENSE", "README.md", "deploy/README.md", "deploy/tornado-rt.service",
                 "deploy/nginx.conf", "deploy/Caddyfile", "tornado_rt/py.typed", "tornado_rt/build.py"):
        assert name in names, name
    for directory in ("docs", "examples", "deploy", "bench"):
        files = tracked(directory)
        assert files or directory == "docs", f"{directory}/ is empty"  # docs/ once it exists
        missing = [f for f in files if f not in names]
        assert not missing, f"not in the sdist: {missing}"
    assert not any(n.startswith("bench/results/") for n in names)
    assert any(n.startswith("examples/") for n in names)


@pytest.mark.gen_test(timeout=300)
async def test_the_wheel_installs_and_serves_in_a_fresh_virtualenv(built, tmp_path):
    from tornado.ioloop import IOLoop

    wheel, _ = built
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, clear=True)
    python = env_dir / "bin" / "python"
    environ = {k: v for k, v in clean_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = await IOLoop.current().run_in_executor(None, lambda: subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True, timeout=240,
        env=environ))
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    # The installed package, not this checkout: imported from the new virtualenv's site-packages.
    where = subprocess.run([str(python), "-c", "import tornado_rt, tornado_rt_plugins; print(tornado_rt.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=environ, timeout=60)
    assert where.returncode == 0 and str(env_dir) in where.stdout, where
    script = env_dir / "bin" / "tornado-rt"
    proc = ServeProcess(["serve", "--dev", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY],
                        env=environ, argv0=str(script))
    try:
        client = await WsClient.connect(proc.ws_url, make_token(1))
        await client.subscribe("table", table_id=1)
        message = {"type": "rows_created", "table_id": 1, "rows": [{"id": 3}], "metadata": {}, "before_row_id": None}
        assert await Api(proc.base).publish({"message": message}) == {"published": 1, "delivered": 1}
        assert await client.recv() == message
        client.close()
    finally:
        assert await proc.stopped() == 0, proc.output()
    assert os.path.exists(env_dir / "lib") and "Traceback" not in proc.stderr()
