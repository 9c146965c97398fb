"""Real infrastructure for the Redis broker tests: a ``redis-server`` subprocess on a free port
and ``tornado-rt serve`` subprocesses that use it, plus WebSocket and HTTP clients for them.

Nothing is mocked. Every process started here is killed by a fixture finalizer (and by
``atexit`` as a last resort). Traffic goes to 127.0.0.1 only.

Without the ``redis-server`` binary the Redis tests are skipped locally, but they FAIL in CI
(``CI`` set in the environment): CI must run them (``.ci/run`` installs the binary).
"""
from __future__ import annotations

import atexit
import itertools
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, List, Optional, Sequence

import jwt
import pytest
import ujson
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

SECRET = "redis-tests-secret-that-is-long-enough-for-hs256"
API_KEY = "redis-tests-api-key"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_started: List[subprocess.Popen] = []
_markers = itertools.count(1)


def _kill_all() -> None:
    for proc in _started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


atexit.register(_kill_all)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the test process dies, even by SIGKILL (Linux;
    elsewhere the fixture finalizers and atexit are the only cleanup)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def redis_binary() -> Optional[str]:
    return shutil.which("redis-server")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_redis_package() -> None:
    """Skip without redis-py (``pip install tornado-rt[redis]``), except in CI: a failure there."""
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        if in_ci():
            pytest.fail("redis-py is not installed, and CI is set: install the redis extra")
        pytest.skip("redis-py is not installed (pip install 'tornado-rt[redis]'; the Redis tests run in CI)")


def require_redis_binary() -> str:
    """The redis-server path (and redis-py); skip the test without them, except in CI where it is
    a failure."""
    require_redis_package()
    path = redis_binary()
    if path is None:
        if in_ci():
            pytest.fail("redis-server is not installed, and CI is set: the Redis tests must run in "
                        "CI (install the Debian package redis-server)")
        pytest.skip("redis-server is not installed (the Redis tests run in CI)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """A real redis-server on 127.0.0.1, without persistence, that can be killed and restarted
    on the same port."""

    def __init__(self, binary: str, port: Optional[int] = None, args: Sequence[str] = ()):
        self.binary = binary
        self.port = port or free_port()
        self.args = list(args)  # extra redis-server options, e.g. ["--client-output-buffer-limit", ...]
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "yes", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        _started.append(self.proc)
        deadline = time.monotonic() + 10
        while not _ping(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING within 10 s")
            time.sleep(0.02)  # barrier-ok: polling until redis-server answers PING
        return self

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients; their sockets see the connection drop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the session (tests that kill Redis start their own)."""
    server = RedisProcess(require_redis_binary()).start()
    yield server
    server.kill()


# --- tornado-rt serve subprocesses ------------------------------------------------------------------

def serve_command(redis_url: str) -> List[str]:
    return [sys.executable, "-m", "tornado_rt", "serve", "--host", "127.0.0.1", "--port", "0",
            "--jwt-secret", SECRET, "--api-key", API_KEY, "--broker", redis_url]


class Node:
    """One ``tornado-rt serve`` process: its WebSocket URL and its HTTP server API.

    ``Node(name, redis_url)`` spawns it; :meth:`wait_started` reads its start-up line (start
    several, then wait for each, so that they boot in parallel)."""

    def __init__(self, name: str, redis_url: str, args: Sequence[str] = ()):
        self.name = name
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORNADO_RT_")}
        self.log = tempfile.NamedTemporaryFile(prefix=f"tornado-rt-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(serve_command(redis_url) + list(args), cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=self.log, preexec_fn=_die_with_parent)
        _started.append(self.proc)
        self.ws_url = self.http_url = ""

    def wait_started(self, timeout: float = 20) -> "Node":
        line = self._start_line(timeout)
        ws = re.search(r"ws://[^\s,;'\"]+", line)
        http = re.search(r"http://[^\s,;'\"]+", line)
        if not ws or not http:
            log = self.log_text()
            self.stop()
            raise RuntimeError(f"unexpected start-up line from tornado-rt serve: {line!r}\n{log}")
        self.ws_url = ws.group(0)
        match = re.match(r"(http://[^/]+)", http.group(0))
        self.http_url = match.group(1)
        # Keep draining stdout so that the process never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _start_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                line = fd.readline().decode(errors="replace")
                if not line:
                    break
                if "ws://" in line:
                    return line
            elif self.proc.poll() is not None:
                break
        log = self.log_text()
        self.stop()
        raise RuntimeError(f"tornado-rt serve ({self.name}) did not print its URLs; log:\n{log}")

    def _drain(self) -> None:
        try:
            for _ in self.proc.stdout:
                pass
        except (OSError, ValueError):
            pass

    def log_text(self) -> str:
        try:
            with open(self.log.name, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if it does not exit within 5 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass

    # --- HTTP server API --------------------------------------------------------------------------
    async def call(self, method: str, path: str, body: Any = None, headers: Optional[dict] = None):
        """(status, decoded JSON body) of one HTTP API call."""
        all_headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        all_headers.update(headers or {})
        request = HTTPRequest(self.http_url + path, method=method, headers=all_headers,
                              body=None if body is None else ujson.dumps(body), request_timeout=15)
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        if response.code == 599:
            raise AssertionError(f"{self.name}: {method} {path} failed: {response.error}\n{self.log_text()}")
        try:
            data = ujson.loads(response.body) if response.body else None
        except ValueError:
            data = response.body
        return response.code, data

    async def publish(self, envelope: Any, headers: Optional[dict] = None) -> Any:
        status, data = await self.call("POST", "/api/publish", envelope, headers)
        assert status == 200, (self.name, status, data)
        return data

    async def put_directory(self, snapshot: dict) -> None:
        status, data = await self.call("PUT", "/api/directory", snapshot)
        assert status == 200, (self.name, status, data)

    async def directory(self) -> dict:
        status, data = await self.call("GET", "/api/directory")
        assert status == 200, (self.name, status, data)
        return data


def token(user_id: int, lifetime: int = 600) -> str:
    return jwt.encode({"user_id": user_id, "exp": int(time.time()) + lifetime, "token_type": "access"},
                      SECRET, algorithm="HS256")


class WSClient:
    """A real WebSocket client of one node, decoding JSON messages."""

    def __init__(self, conn, node: Node):
        self.conn = conn
        self.node = node
        self.web_socket_id: Optional[str] = None

    async def recv(self) -> Any:
        msg = await self.conn.read_message()
        assert msg is not None, f"connection to {self.node.name} closed (code {self.conn.close_code})"
        return ujson.loads(msg)

    async def send(self, obj: Any) -> None:
        await self.conn.write_message(ujson.dumps(obj))

    async def subscribe(self, page: str, **params: Any) -> dict:
        await self.send({"page": page, **params})
        reply = await self.recv()
        assert reply["type"] == "page_add", reply
        return reply

    async def closed(self) -> Optional[int]:
        """Read until the server closes the connection; returns the close code."""
        while await self.conn.read_message() is not None:
            pass
        return self.conn.close_code

    def close(self) -> None:
        self.conn.close()


def marker_message() -> dict:
    """A message of a built-in type with an explicit audience, unique per call."""
    return {"type": "notifications_fetch_required", "marker": next(_markers)}


def start_nodes(redis_url: str, count: int, args: Sequence[str] = ()) -> List[Node]:
    """``count`` tornado-rt serve processes on ``redis_url`` (with extra serve ``args``), booted
    in parallel."""
    nodes = [Node("ABC"[i] if i < 3 else f"N{i}", redis_url, args) for i in range(count)]
    try:
        for node in nodes:
            node.wait_started()
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes
