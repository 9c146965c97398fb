"""deploy/: the committed nginx and Caddy configurations run for real (Debian's nginx and caddy on
loopback ports, in front of a real ``tornado-rt serve``), and the systemd unit checked by
``systemd-analyze verify``.

The proxy configurations are the committed files with only the ports, paths and timeouts
substituted (each substitution must match, so a changed file cannot silently test something
else). Missing nginx/caddy/systemd-analyze skip the test locally and fail it in CI."""
import asyncio
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from redis_fixtures import free_port
from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient, make_token
from tools import need

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
READ_TIMEOUT = 2  # the proxies' read timeout in the test copies (production: 75 s)
PING_INTERVAL = 0.5  # tornado-rt's heartbeat in these tests (production default: 25 s)


def require(program, package):
    """The program (nginx lives in /usr/sbin, which a user's PATH may lack); skip locally, fail in CI."""
    return shutil.which(program, path="/usr/sbin:/sbin") or need(program, f"the Debian package {package}")


def substitute(text, replacements):
    """Apply (pattern, replacement) pairs, each of which must match at least once."""
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count, f"the committed file no longer contains {pattern!r}"
    return text


def wait_listening(port, proc, name, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            assert proc.poll() is None, f"{name} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{name} is not listening on {port}"
            time.sleep(0.05)  # barrier-ok: polling until the proxy listens


def wait_for_text(path, text, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.05)  # barrier-ok: polling until the proxy wrote its log line


def serve(ping_interval):
    return ServeProcess(["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY,
                         "--trusted-proxy", "127.0.0.1", "--log-level", "info",
                         "--ping-interval", str(ping_interval), "--ping-timeout", str(ping_interval)])


# --- nginx ------------------------------------------------------------------------------------------

class Nginx:
    def __init__(self, tmp, upstream_port):
        binary = require("nginx", "nginx")
        self.port = free_port()
        self.access_log = tmp / "access.log"
        site = substitute((DEPLOY / "nginx.conf").read_text(), [
            (r"^(\s*)listen 80;", rf"\1listen 127.0.0.1:{self.port};"),
            (r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{upstream_port};"),
            (r"/var/log/nginx/tornado-rt\.access\.log", str(self.access_log)),
            (r"proxy_read_timeout 75s;", f"proxy_read_timeout {READ_TIMEOUT}s;"),
            (r"proxy_send_timeout 75s;", f"proxy_send_timeout {READ_TIMEOUT}s;"),
        ])
        (tmp / "tornado-rt.conf").write_text(site)
        user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
        temp = "\n".join(f"    {kind}_temp_path {tmp}/{kind};" for kind in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (tmp / "nginx.conf").write_text(f"""{user}
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 64; }}
http {{
{temp}
    include {tmp}/tornado-rt.conf;
}}
""")
        self.proc = subprocess.Popen([binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e",
                                      str(tmp / "error.log")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            wait_listening(self.port, self.proc, "nginx")
        except AssertionError:
            self.stop()
            raise AssertionError(f"nginx did not start: {self.proc.stderr.read()}"
                                 f"{(tmp / 'error.log').read_text() if (tmp / 'error.log').exists() else ''}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: the access log is complete afterwards
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- Caddy ------------------------------------------------------------------------------------------

class Caddy:
    def __init__(self, tmp, upstream_port):
        binary = require("caddy", "caddy")
        self.port = free_port()
        self.access_log = tmp / "access.log"
        config = substitute((DEPLOY / "Caddyfile").read_text(), [
            (r"^\s*admin localhost:2019$", "\tadmin off"),
            (r"^realtime\.example\.com \{", f"http://127.0.0.1:{self.port} {{"),
            (r"reverse_proxy 127\.0\.0\.1:8000", f"reverse_proxy 127.0.0.1:{upstream_port}"),
            (r"/var/log/caddy/tornado-rt\.access\.log", str(self.access_log)),
            (r"read_timeout 75s", f"read_timeout {READ_TIMEOUT}s"),
            (r"write_timeout 75s", f"write_timeout {READ_TIMEOUT}s"),
        ])
        (tmp / "Caddyfile").write_text(config)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp), "XDG_DATA_HOME": str(tmp / "data"),
               "XDG_CONFIG_HOME": str(tmp / "config")}
        self.stderr = open(tmp / "caddy.log", "w+")
        self.proc = subprocess.Popen([binary, "run", "--config", str(tmp / "Caddyfile"), "--adapter", "caddyfile"],
                                     env=env, stdout=self.stderr, stderr=self.stderr, stdin=subprocess.DEVNULL)
        try:
            wait_listening(self.port, self.proc, "caddy")
        except AssertionError:
            self.stop()
            self.stderr.seek(0)
            raise AssertionError(f"caddy did not start: {self.stderr.read()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: flushes and closes the log
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


PROXIES = {"nginx": Nginx, "caddy": Caddy}


async def connect_through(proxy_port, token, headers=None):
    """A WebSocket session through the proxy, from a page served by the proxy's own host (so the
    same-host Origin check passes only when the proxy forwards Host)."""
    origin = f"http://127.0.0.1:{proxy_port}"
    return await WsClient.connect(f"ws://127.0.0.1:{proxy_port}/ws/core/", token,
                                  headers={"Origin": origin, **(headers or {})})


def count_pings(client):
    """Count the heartbeat pings the client receives (it answers each with a pong)."""
    state = {"count": 0, "waiters": []}

    def on_ping(data):
        state["count"] += 1
        for n, future in list(state["waiters"]):
            if state["count"] >= n and not future.done():
                future.set_result(None)

    async def until(n):
        future = asyncio.get_running_loop().create_future()
        state["waiters"].append((n, future))
        if state["count"] >= n:
            return
        await future

    client.conn.on_ping = on_ping
    return until


@pytest.mark.parametrize("name", sorted(PROXIES))
@pytest.mark.gen_test(timeout=60)
async def test_a_websocket_session_through_the_proxy(name, tmp_path):
    server = serve(PING_INTERVAL)
    proxy = None
    token = make_token(1)
    try:
        proxy = PROXIES[name](tmp_path, server.port)
        api = Api(f"http://127.0.0.1:{proxy.port}/")
        await api.ok("PUT", "/api/directory", {"workspaces": {"1": [1]}, "tables": {"1": 1}})
        client = await connect_through(proxy.port, token, {"X-Forwarded-For": "203.0.113.5"})
        await client.subscribe("table", table_id=1)
        message = {"type": "rows_created", "table_id": 1, "rows": [{"id": 1}], "metadata": {}, "before_row_id": None}
        assert await api.publish({"message": message}) == {"published": 1, "delivered": 1}
        assert await client.recv() == message

        # Idle for longer than the proxy's read timeout: only the heartbeat crosses the proxy.
        pings = count_pings(client)
        idle_from = time.monotonic()
        await pings(int(READ_TIMEOUT / PING_INTERVAL) + 3)
        assert time.monotonic() - idle_from > READ_TIMEOUT  # the premise of this test held
        message = {**message, "rows": [{"id": 2}]}
        assert await api.publish({"message": message}) == {"published": 1, "delivered": 1}
        assert await client.recv() == message  # the connection survived
        await api.barrier(client)
        client.close()
        assert await client.conn.read_message() is None
        # The proxy logs a WebSocket request when its connection ends: wait for that line.
        wait_for_text(proxy.access_log, "/ws/core/")
    finally:
        if proxy is not None:
            proxy.stop()
        assert await server.stopped() == 0, server.output()

    log = proxy.access_log.read_text()
    assert "/ws/core/" in log, log  # the session was logged ...
    assert token not in log and token.split(".")[1] not in log and API_KEY not in log, log  # ... without secrets
    assert "jwt_token=ey" not in log
    if name == "caddy":
        assert "/ws/core/?jwt_token=REDACTED" in log, log
    upgraded = [line for line in server.stderr().splitlines() if "tornado.access: 101 " in line]
    assert len(upgraded) == 1, server.output()
    if name == "nginx":  # nginx appends to X-Forwarded-For; tornado-rt trusts 127.0.0.1, the proxy
        assert "(203.0.113.5)" in upgraded[0], server.output()
    else:  # Caddy replaces X-Forwarded-For with the address it saw (it trusts no proxies itself)
        assert "(127.0.0.1)" in upgraded[0], server.output()


@pytest.mark.parametrize("name", sorted(PROXIES))
@pytest.mark.gen_test(timeout=60)
async def test_without_the_heartbeat_the_proxy_drops_the_idle_connection(name, tmp_path):
    """The control experiment: the proxy's read timeout is real, so the session above survived
    because of the heartbeat."""
    server = serve(0)
    proxy = None
    try:
        proxy = PROXIES[name](tmp_path, server.port)
        client = await connect_through(proxy.port, make_token(1))
        started = time.monotonic()
        assert await client.conn.read_message() is None  # the proxy closed it
        assert time.monotonic() - started >= READ_TIMEOUT - 0.5  # by its timeout, not at once
    finally:
        if proxy is not None:
            proxy.stop()
        assert await server.stopped() == 0, server.output()


def test_proxy_configurations_carry_what_websockets_need():
    nginx = (DEPLOY / "nginx.conf").read_text()
    ws = nginx[nginx.index("location /ws/"):]
    ws = ws[: ws.index("\n    }")]
    for directive in ("proxy_set_header Upgrade           $http_upgrade;",
                      "proxy_set_header Connection        $connection_upgrade;",
                      "proxy_set_header Host              $http_host;",
                      "proxy_set_header X-Forwarded-For   $proxy_add_x_forwarded_for;",
                      "proxy_set_header X-Forwarded-Proto $scheme;", "proxy_buffering off;",
                      "proxy_pass http://tornado_rt;"):
        assert directive in ws, directive
    assert "proxy_http_version 1.1;" in nginx
    for timeout in re.findall(r"proxy_(?:read|send)_timeout (\d+)s;", ws):
        assert int(timeout) > 25, "longer than tornado-rt's default ping interval"
    log_format = nginx[nginx.index("log_format"):nginx.index(";", nginx.index("log_format"))]
    assert "$request " not in log_format and "$request_uri" not in log_format and "$args" not in log_format
    caddy = (DEPLOY / "Caddyfile").read_text()
    assert "replace jwt_token REDACTED" in caddy and "flush_interval -1" in caddy
    for timeout in re.findall(r"(?:read|write)_timeout (\d+)s", caddy):
        assert int(timeout) > 25


# --- systemd ----------------------------------------------------------------------------------------

def verify_unit(tmp_path, text):
    analyze = require("systemd-analyze", "systemd")
    unit = tmp_path / "tornado-rt.service"
    unit.write_text(text)
    return subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})


def installed_unit():
    """The committed unit with ExecStart pointing at this environment's tornado-rt (verify checks
    that the program exists and is executable)."""
    script = shutil.which("tornado-rt") or str(Path(os.sys.executable).with_name("tornado-rt"))
    assert os.access(script, os.X_OK), "the tornado-rt console script is not installed"
    return substitute((DEPLOY / "tornado-rt.service").read_text(),
                      [(r"^ExecStart=/usr/local/bin/tornado-rt ", f"ExecStart={script} ")])


def test_systemd_unit_verifies_cleanly(tmp_path):
    result = verify_unit(tmp_path, installed_unit())
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def test_systemd_verify_would_catch_a_broken_directive(tmp_path):
    """The control: a misspelt hardening directive is reported (so the clean result means something)."""
    broken = substitute(installed_unit(), [(r"^ProtectSystem=strict$", "ProtectSytem=strict")])
    result = verify_unit(tmp_path, broken)
    assert "Unknown key" in result.stdout + result.stderr and "ProtectSytem" in result.stdout + result.stderr


def test_systemd_unit_has_the_required_directives():
    unit = (DEPLOY / "tornado-rt.service").read_text()
    directives = dict(re.findall(r"^(\w+)=(.*)$", unit, flags=re.MULTILINE))
    assert directives["User"] == "tornado-rt" and directives["Group"] == "tornado-rt"
    assert directives["EnvironmentFile"].startswith("/etc/tornado-rt/")
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                       ("Restart", "on-failure"), ("KillSignal", "SIGTERM"), ("KillMode", "mixed")):
        assert directives[key] == value, key
    assert int(directives["LimitNOFILE"]) >= 65536
    assert 10 <= int(directives["TimeoutStopSec"]) <= 120
    assert "serve" in directives["ExecStart"] and "SECRET" not in directives["ExecStart"].upper()
