"""The JS client (tornado_rt/static/tornado-rt.js) under Node's own test runner: this test starts
a real ``tornado-rt serve``, runs ``node --test tests/js/`` against it (the JS tests start more
servers themselves for the restart test) and requires exit 0, so the README's test command
covers the JS client. Node and the ``ws`` package (``npm ci --prefix tests/js``) are needed: the
test skips without them on a developer machine and FAILS when ``CI=true``."""
import subprocess
import sys
from pathlib import Path

import pytest

from redis_fixtures import in_ci
from standalone import API_KEY, SECRET, ServeProcess, clean_env
from tools import need

JS_DIR = Path(__file__).parent / "js"


def test_js_client_under_node_test():
    node = need("node", "nodejs")  # skip locally, fail in CI, like every external component
    if not (JS_DIR / "node_modules" / "ws" / "package.json").exists():
        missing = "the ws package is not installed: run npm ci --prefix tests/js"
        if in_ci():
            pytest.fail(f"the JS client tests cannot run: {missing}")
        pytest.skip(missing)
    server = ServeProcess(["serve", "--dev", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY])
    try:
        env = clean_env(RT_WS_URL=server.ws_url, RT_HTTP_URL=server.base, RT_SECRET=SECRET, RT_API_KEY=API_KEY,
                        RT_PYTHON=sys.executable)
        result = subprocess.run([node, "--test", "--test-concurrency=1", "tests/js/"],
                                cwd=JS_DIR.parent.parent, env=env, capture_output=True, text=True, timeout=120)
    finally:
        assert server.stop() == 0, server.output()
    assert result.returncode == 0, f"node --test failed:\n{result.stdout}\n{result.stderr}"
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout, result.stdout
