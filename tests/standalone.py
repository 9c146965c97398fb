"""Helpers for the standalone-server tests: a real ``tornado-rt serve`` subprocess on a free port,
an HTTP client for its API, real WebSocket clients, and the marker barrier that proves a message
did NOT arrive (the marker must be the next message each client receives)."""
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jwt
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

SECRET = "standalone-test-secret-long-enough-for-hs256"
API_KEY = "standalone-test-api-key-0123456789"
STARTUP = re.compile(r"^tornado-rt listening: (wss?://\S+)  (https?://\S+)$")
START_TIMEOUT = 30.0

_markers = itertools.count(1)


def make_token(user_id=1, secret=SECRET, lifetime=300, **claims):
    payload = {"user_id": user_id, "exp": int(time.time()) + lifetime, "token_type": "access", **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def clean_env(**extra):
    """The environment without any TORNADO_RT_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORNADO_RT_")}
    env.update(extra)
    return env


def command(*args):
    return [sys.executable, "-m", "tornado_rt", *args]


def run_cli(args, env=None, timeout=30):
    """Run ``python -m tornado_rt ARGS`` to completion (for refusals): CompletedProcess."""
    return subprocess.run(command(*args), env=env if env is not None else clean_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class ServeProcess:
    """``tornado-rt serve`` running as a subprocess; ``ws_url`` and ``http_url`` come from its
    start-up line (so ``--port 0`` is exercised)."""

    def __init__(self, args, env=None, argv0=None, preexec_fn=None):
        self.stderr_file = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        cmd = [argv0, *args] if argv0 else command(*args)
        self.proc = subprocess.Popen(cmd, env=env if env is not None else clean_env(),
                                     stdout=subprocess.PIPE, stderr=self.stderr_file,
                                     stdin=subprocess.DEVNULL, text=True, bufsize=1, preexec_fn=preexec_fn)
        self.stdout_lines = []
        self._lines = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ws_url = self.http_url = None
        deadline = time.monotonic() + START_TIMEOUT
        while self.ws_url is None:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no start-up line within {START_TIMEOUT}s:\n{self.output()}")
            if line is None:
                self.proc.wait()
                raise AssertionError(f"the server exited ({self.proc.returncode}) before starting:\n{self.output()}")
            match = STARTUP.match(line.rstrip("\n"))
            if match:
                self.ws_url, self.http_url = match.groups()
        self.port = int(re.search(r":(\d+)/", self.http_url).group(1))
        self.base = self.http_url[: -len("api/")]

    def _read(self):
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def stop(self, signum=signal.SIGTERM, timeout=20):
        """Send ``signum`` and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._reader.join(timeout=5)

    async def stopped(self, signum=signal.SIGTERM, timeout=20):
        """Like :meth:`stop`, awaited: the IOLoop keeps running (so this process's WebSocket
        clients can answer the server's close frames) while the server shuts down."""
        from tornado.ioloop import IOLoop
        return await IOLoop.current().run_in_executor(None, self.stop, signum, timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stdout(self):
        return "".join(self.stdout_lines)

    def stderr(self):
        self.stderr_file.seek(0)
        return self.stderr_file.read()

    def output(self):
        return f"--- stdout ---\n{self.stdout()}--- stderr ---\n{self.stderr()}"


class Api:
    """The HTTP server API of a running server."""

    def __init__(self, base, key=API_KEY):
        self.base = base.rstrip("/")
        self.key = key
        self.client = AsyncHTTPClient()

    async def call(self, method, path, body=None, headers=None, key="default", raw=None,
                   content_type="application/json"):
        """Returns (status, parsed JSON body or text, response)."""
        all_headers = {}
        key = self.key if key == "default" else key
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        if content_type is not None and (body is not None or raw is not None):
            all_headers["Content-Type"] = content_type
        all_headers.update(headers or {})
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        if data is None and method in ("POST", "PUT"):
            data = b""
        request = HTTPRequest(self.base + path, method=method, body=data, headers=all_headers,
                              allow_nonstandard_methods=True, request_timeout=15)
        response = await self.client.fetch(request, raise_error=False)
        text = response.body.decode("utf-8") if response.body else ""
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return response.code, parsed, response

    async def ok(self, method, path, body=None, **kw):
        status, parsed, _ = await self.call(method, path, body, **kw)
        assert status == 200, (status, parsed)
        return parsed

    async def publish(self, body, **kw):
        return await self.ok("POST", "/api/publish", body, **kw)

    async def barrier(self, *clients):
        """Publish a marker to every connection over HTTP; it must be the next message of each
        client: whatever did not arrive before it was not sent."""
        marker = {"type": "user_data_updated", "user_data": {"marker": next(_markers)}}
        answer = await self.publish({"message": marker, "to": {"all_users": True}})
        assert answer["published"] == 1 and isinstance(answer["delivered"], int), answer
        for client in clients:
            got = await client.recv()
            assert got == marker, f"{client.name}: expected nothing before the marker, got {got}"


class WsClient:
    """A real WebSocket client decoding JSON messages."""

    def __init__(self, conn, name):
        self.conn = conn
        self.name = name
        self.web_socket_id = None

    @classmethod
    async def connect(cls, ws_url, token=None, user_id=1, name=None, headers=None):
        token = make_token(user_id) if token is None else token
        request = HTTPRequest(f"{ws_url}?jwt_token={token}", headers=headers or {}, request_timeout=15)
        client = cls(await websocket_connect(request), name or f"user {user_id}")
        auth = await client.recv()
        assert auth["type"] == "authentication" and auth["success"] is True, auth
        client.web_socket_id = auth["web_socket_id"]
        return client

    async def recv(self):
        msg = await self.conn.read_message()
        assert msg is not None, f"{self.name}: connection closed (code {self.conn.close_code})"
        return json.loads(msg)

    async def send(self, obj):
        await self.conn.write_message(json.dumps(obj))

    async def subscribe(self, page, **params):
        await self.send({"page": page, **params})
        reply = await self.recv()
        assert reply["type"] == "page_add" and reply["page"] == page, reply
        return reply

    async def closed(self):
        """Read until the server closes; returns the close code."""
        while await self.conn.read_message() is not None:
            pass
        return self.conn.close_code

    def close(self):
        self.conn.close()
