"""The TCP/HTTP front (issue 10, items 1-3), against real ``tornado-rt serve`` subprocesses over
raw sockets: the accept loop at the file descriptor limit, header/idle/body timeouts, bodies
refused at the head, the API key checked before the body, and the per-address cap on
unauthenticated connections. Plus the same guard used in-process by an embedding program.

Waits are bounded and wait for a condition (a socket reading EOF, a counter on /metrics); no test
asserts a duration.
"""
import asyncio
import json
import re
import resource
import select
import socket
import time

import pytest

from standalone import API_KEY, SECRET, ServeProcess, WsClient, make_token
from tornado_rt import RealtimeServer, Settings
from tornado_rt.httpapi import make_app

BASE = ["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY]
WAIT = 30.0  # the bound of every wait for a condition


# --- a tiny blocking HTTP/1.1 client over one raw socket ----------------------------------------------

def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def request_bytes(method, path, headers=None, body=b""):
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_response(sock):
    """(status, headers, body) of one response; None if the server closed without answering."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            assert not data, f"connection closed in the middle of a response head: {data!r}"
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a response body"
        rest += chunk
    return status, headers, rest[:length]


def closed_by_server(sock):
    """Whether the next read says the server closed ``sock``: EOF, or a reset (a close with bytes
    of ours still unread there)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def call(sock, method, path, headers=None, body=b""):
    sock.sendall(request_bytes(method, path, headers, body))
    return read_response(sock)


def json_call(sock, method, path, obj=None, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = b""
    if obj is not None:
        headers["Content-Type"] = "application/json"
        body = json.dumps(obj).encode()
    status, _, raw = call(sock, method, path, headers, body)
    return status, json.loads(raw) if raw else None


def reads_eof(sock, timeout=WAIT):
    """Whether the server closes ``sock`` (the next read gives EOF) within the bound."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except socket.timeout:
        return False
    finally:
        sock.settimeout(WAIT)


def metric(text, name, labels=""):
    match = re.search(rf"^{re.escape(name + labels)} ([0-9.e+]+)$", text, re.M)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def scrape(sock):
    status, _, body = call(sock, "GET", "/metrics")
    assert status == 200
    return body.decode()


async def wait_for_metric(sock, name, labels, predicate):
    deadline = time.monotonic() + WAIT
    while True:
        value = metric(scrape(sock), name, labels)
        if predicate(value):
            return value
        assert time.monotonic() < deadline, f"{name}{labels} stayed at {value}"
        await asyncio.sleep(0.05)  # barrier-ok: polls a counter, asserts nothing about time


def assert_clean_log(proc):
    err = proc.stderr()
    assert "Traceback" not in err, proc.output()
    assert " ERROR " not in err, proc.output()


# --- (1) the file descriptor limit ---------------------------------------------------------------

FD_LIMIT = 64


def low_fd_limit():
    # Soft AND hard: `serve` raises the soft limit to the hard one at start.
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.mark.gen_test(timeout=90)
async def test_out_of_file_descriptors_refuses_counts_logs_once_and_recovers():
    proc = ServeProcess([*BASE, "--header-timeout", "600", "--idle-timeout", "600"], preexec_fn=low_fd_limit)
    idle = []
    try:
        assert f"file descriptor limit: RLIMIT_NOFILE {FD_LIMIT} (hard limit {FD_LIMIT})" in proc.stderr()
        bystander = await WsClient.connect(proc.ws_url, user_id=1, name="bystander")
        api = connect(proc.port)  # a keep-alive connection made before the descriptors run out
        assert metric(scrape(api), "tornado_rt_connections_refused_total", '{reason="fd_limit"}') == 0

        for _ in range(2 * FD_LIMIT):  # more than the process has descriptors for
            idle.append(connect(proc.port))
        refused = await wait_for_metric(api, "tornado_rt_connections_refused_total", '{reason="fd_limit"}',
                                        lambda v: v > 0)
        assert refused > 0
        # A refused client is told at once (EOF), it does not hang until its own timeout.
        readable, _, _ = select.select(idle, [], [], WAIT)  # barrier-ok: bounded wait for a close
        assert readable and all(closed_by_server(s) for s in readable)

        # Existing connections are served: the keep-alive API connection publishes, the
        # authenticated WebSocket receives it.
        marker = {"type": "user_data_updated", "user_data": {"marker": "fd"}}
        status, body = json_call(api, "POST", "/api/publish", {"message": marker, "to": {"all_users": True}})
        assert (status, body["published"], set(body)) == (200, 1, {"published", "delivered"})
        assert await bystander.recv() == marker

        # Descriptors come back: accepting resumes by itself.
        for sock in idle:
            sock.close()
        idle.clear()
        deadline = time.monotonic() + WAIT
        while True:
            try:
                fresh = connect(proc.port)
                answer = call(fresh, "GET", "/healthz")
                fresh.close()
            except (ConnectionResetError, BrokenPipeError):  # still refused: accept-and-close
                answer = None
            if answer is not None:
                break
            assert time.monotonic() < deadline, "the server never accepted again"
            await asyncio.sleep(0.05)  # barrier-ok: waits for the server to see the closes
        assert answer[0] == 200
        newcomer = await WsClient.connect(proc.ws_url, user_id=2, name="newcomer")
        newcomer.close()
        bystander.close()
        api.close()

        err = proc.stderr()
        warnings = [line for line in err.splitlines() if "out of file descriptors" in line]
        assert len(warnings) == 1 and " WARNING " in warnings[0], err
        assert f"soft limit {FD_LIMIT}" in warnings[0] and "EMFILE" in warnings[0]
        assert "file descriptors are available again" in err
        assert_clean_log(proc)
        assert proc.stop() == 0, proc.output()
    finally:
        for sock in idle:
            sock.close()
        proc.kill()


def test_serve_raises_the_soft_fd_limit_to_the_hard_limit():
    def soft_below_hard():
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200))

    proc = ServeProcess(BASE, preexec_fn=soft_below_hard)
    try:
        with open(f"/proc/{proc.proc.pid}/limits") as fh:
            line = next(line for line in fh if line.startswith("Max open files"))
        assert line.split()[3:5] == ["200", "200"], line
        assert "raised the soft RLIMIT_NOFILE from 100 to 200 (hard limit 200)" in proc.stderr()
        assert proc.stop() == 0, proc.output()
    finally:
        proc.kill()


# --- (2) timeouts --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timeouts():
    proc = ServeProcess([*BASE, "--header-timeout", "1", "--idle-timeout", "1", "--body-timeout", "1"])
    yield proc
    assert_clean_log(proc)
    assert proc.stop() == 0, proc.output()


def test_slowloris_head_is_cut_off_at_the_header_timeout(timeouts):
    sock = connect(timeouts.port)
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    sent = 0
    deadline = time.monotonic() + WAIT
    with sock:
        while True:
            # One byte at a time, never completing the head; stop when the server closes.
            readable, _, _ = select.select([sock], [], [], 0.2)  # barrier-ok: paces the trickle
            if readable:
                # The server closed it: EOF, or a reset when the byte just sent was still unread
                # in its socket (the kernel answers a close with unread data with RST).
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                assert data == b"", "the server answered instead of closing"
                break
            assert time.monotonic() < deadline, f"still connected after {sent} bytes"
            try:
                sock.send(head[sent:sent + 1] if sent < len(head) else b"a")
            except (ConnectionResetError, BrokenPipeError):
                break  # closed by the server between the check and the send
            sent += 1
    with connect(timeouts.port) as probe:
        probe.sendall(request_bytes("GET", "/metrics"))
        body = read_response(probe)[2].decode()
    assert metric(body, "tornado_rt_http_header_timeouts_total") >= 1


def test_silent_connection_is_closed_at_the_header_timeout(timeouts):
    with connect(timeouts.port) as sock:
        assert reads_eof(sock)


def test_idle_keep_alive_connection_is_closed_at_the_idle_timeout(timeouts):
    with connect(timeouts.port) as sock:
        assert call(sock, "GET", "/healthz")[0] == 200
        assert reads_eof(sock)


def test_slow_body_is_cut_off_at_the_body_timeout(timeouts):
    with connect(timeouts.port) as sock:
        sock.sendall(request_bytes("POST", "/api/publish", {
            "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
            "Content-Length": "100"}) + b'{"message"')
        assert reads_eof(sock)


# --- (3) bodies ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def serve():
    proc = ServeProcess([*BASE, "--header-timeout", "600"])
    yield proc
    assert_clean_log(proc)
    assert proc.stop() == 0, proc.output()


TEN_MB = 10 * 1024 * 1024
WS_HEADERS = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.mark.parametrize("method, path, headers, field", [
    ("GET", "/healthz", {"Content-Length": str(TEN_MB)}, "Content-Length"),
    ("GET", "/healthz", {"Transfer-Encoding": "chunked"}, "Transfer-Encoding"),
    ("GET", "/metrics", {"Content-Length": "5"}, "Content-Length"),
    ("GET", "/api/stats", {"Authorization": f"Bearer {API_KEY}", "Content-Length": str(TEN_MB)}, "Content-Length"),
    ("DELETE", "/api/directory/tables/7", {"Authorization": f"Bearer {API_KEY}", "Content-Length": "99"},
     "Content-Length"),
    ("GET", "/ws/core/?jwt_token=anonymous", {**WS_HEADERS, "Content-Length": str(99 * 1024 * 1024)},
     "Content-Length"),
])
def test_body_announced_to_an_endpoint_that_takes_none_is_refused_unread(serve, method, path, headers, field):
    with connect(serve.port) as sock:
        sock.sendall(request_bytes(method, path, headers))  # the head only: no byte of the body is sent
        status, got_headers, body = read_response(sock)
        assert status == 413, body
        error = json.loads(body)
        assert error["field"] == field and "takes no request body" in error["error"]
        assert "jwt_token" not in error["error"]
        assert got_headers["connection"] == "close"
        assert reads_eof(sock)


def test_put_without_body_keeps_working_and_zero_length_is_no_body(serve):
    with connect(serve.port) as sock:
        assert call(sock, "GET", "/healthz", {"Content-Length": "0"})[0] == 200
        status, _ = json_call(sock, "PUT", "/api/directory/workspaces/5/members/9")
        assert status == 200
        status, body = json_call(sock, "PUT", "/api/directory/workspaces/5/members/9", {"x": 1})
        assert status == 413 and body["field"] == "Content-Length"


def test_post_without_the_key_is_answered_401_before_the_body_is_sent(serve):
    with connect(serve.port) as sock:
        sock.sendall(request_bytes("POST", "/api/publish", {"Content-Type": "application/json",
                                                           "Content-Length": str(TEN_MB)}))
        status, headers, body = read_response(sock)
        assert status == 401 and "API key" in json.loads(body)["error"]
        assert reads_eof(sock)


def test_post_with_the_key_still_reads_its_body(serve):
    with connect(serve.port) as sock:
        marker = {"type": "user_data_updated", "user_data": {"n": 1}}
        status, body = json_call(sock, "POST", "/api/publish", {"message": marker, "to": {"all_users": True}})
        assert (status, body["published"], set(body)) == (200, 1, {"published", "delivered"})


def test_bodies_refused_are_counted(serve):
    with connect(serve.port) as sock:
        assert call(sock, "GET", "/healthz", {"Content-Length": "1"})[0] == 413
    with connect(serve.port) as sock:
        assert metric(scrape(sock), "tornado_rt_http_bodies_refused_total") >= 1


# --- the per-address cap on unauthenticated connections --------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_per_address_cap_refuses_the_next_connection_and_releases_authenticated_ones():
    cap = 3
    proc = ServeProcess([*BASE, "--header-timeout", "600", "--max-unauthenticated-per-address", str(cap)])
    held = []
    try:
        held = [connect(proc.port) for _ in range(cap)]
        for sock in held:  # the first N are usable (and stay unauthenticated: /healthz needs no key)
            assert call(sock, "GET", "/healthz")[0] == 200
        with connect(proc.port) as extra:
            assert reads_eof(extra), "the connection over the cap was not closed"
        assert metric(scrape(held[1]), "tornado_rt_connections_refused_total", '{reason="address_limit"}') == 1
        assert metric(scrape(held[1]), "tornado_rt_unauthenticated_connections") == cap

        # A request with the API key releases its connection: one more fits.
        assert json_call(held[0], "GET", "/api/stats")[0] == 200
        newcomer = connect(proc.port)
        held.append(newcomer)
        assert call(newcomer, "GET", "/healthz")[0] == 200
        with connect(proc.port) as extra:
            assert reads_eof(extra)

        # An upgraded WebSocket no longer counts either (once its handshake is done).
        held.pop(2).close()
        await wait_for_metric(held[1], "tornado_rt_unauthenticated_connections", "", lambda v: v == cap - 1)
        client = await WsClient.connect(proc.ws_url, token=make_token(1))
        await wait_for_metric(held[1], "tornado_rt_unauthenticated_connections", "", lambda v: v == cap - 1)
        held.append(connect(proc.port))
        assert call(held[-1], "GET", "/healthz")[0] == 200
        client.close()

        err = proc.stderr()
        lines = [line for line in err.splitlines() if "max_unauthenticated_per_address" in line]
        assert len(lines) == 1 and " WARNING " in lines[0] and "127.0.0.1" in lines[0], err
        assert_clean_log(proc)
        assert proc.stop() == 0, proc.output()
    finally:
        for sock in held:
            sock.close()
        proc.kill()


# --- configuration ----------------------------------------------------------------------------------

def test_settings_validate_the_new_fields():
    for name in ("header_timeout", "idle_timeout", "body_timeout"):
        with pytest.raises(ValueError, match=name):
            Settings(**{name: 0})
    with pytest.raises(ValueError, match="max_unauthenticated_per_address"):
        Settings(max_unauthenticated_per_address=-1)
    defaults = Settings()
    assert (defaults.header_timeout, defaults.idle_timeout, defaults.body_timeout,
            defaults.max_unauthenticated_per_address) == (10.0, 60.0, 60.0, 0)


def test_cli_sources_and_refusals(tmp_path):
    from standalone import clean_env, run_cli
    from tornado_rt import cli

    config = tmp_path / "rt.toml"
    config.write_text("header_timeout = 3\nidle_timeout = 7.5\nmax_unauthenticated_per_address = 4\n")
    args = cli.build_parser().parse_args(["serve", "--config", str(config), "--jwt-secret", "s", "--api-key", "k",
                                          "--body-timeout", "9"])
    resolved = cli.resolve(args, {"TORNADO_RT_IDLE_TIMEOUT": "8"})
    settings = cli.settings(resolved)
    assert (settings.header_timeout, settings.idle_timeout, settings.body_timeout,
            settings.max_unauthenticated_per_address) == (3.0, 8.0, 9.0, 4)

    result = run_cli([*BASE, "--header-timeout", "0"])
    assert result.returncode == 2 and "--header-timeout" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(BASE, env=clean_env(TORNADO_RT_MAX_UNAUTHENTICATED_PER_ADDRESS="-1"))
    assert result.returncode == 2 and "TORNADO_RT_MAX_UNAUTHENTICATED_PER_ADDRESS" in result.stderr


# --- in-process, as an embedding program uses it -------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_embedded_listen_refuses_an_upgrade_body_and_cuts_a_slowloris():
    from tornado_rt import listen

    rt = RealtimeServer(Settings(jwt_secret=SECRET, ping_interval=0), load_entry_points=False)
    server = listen(make_app(rt, [API_KEY]), 0, "127.0.0.1", settings=Settings(header_timeout=0.5))
    port = server.ports[0]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes("GET", "/ws/core/?jwt_token=anonymous",
                                   {**WS_HEADERS, "Content-Length": str(99 * 1024 * 1024)}))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 413 ")
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never completed
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # EOF: closed by the server
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes("GET", "/metrics"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
        text = (await asyncio.wait_for(reader.readexactly(length), WAIT)).decode()
        writer.close()
        assert metric(text, "tornado_rt_http_header_timeouts_total") == 1
        assert metric(text, "tornado_rt_http_bodies_refused_total") == 1
    finally:
        server.stop()


@pytest.mark.parametrize("method, path, headers", [
    ("GET", "/healthz", b""),
    ("POST", "/api/publish", f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n".encode()),
])
def test_a_content_length_of_non_ascii_digits_is_refused_as_not_a_number(serve, method, path, headers):
    # b"\xb2" is "²" in Latin-1 (how HTTP heads are decoded): str.isdigit() says yes, int() refuses it.
    with connect(serve.port) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + headers
                     + b"Content-Length: \xb2\r\n\r\n")
        answer = read_response(sock)
        assert answer is not None and answer[0] == 400, answer
        assert json.loads(answer[2]) == {"error": "Content-Length is not a number", "field": "Content-Length"}
        assert reads_eof(sock)
    with connect(serve.port) as sock:  # the server goes on serving
        assert call(sock, "GET", "/healthz")[0] == 200
