"""The lean WebSocket upgrade (transport.RealtimeProtocol._accept_connection): the 101 answer is
precomputed bytes queued ahead of the connection's first frame instead of Tornado's response
machinery. Every test runs twice over real sockets: with the lean upgrade, and with Tornado's own
(forced, as when the contract check fails); the answers must be the same. The refusals before the
upgrade (Upgrade/Connection headers, version, key, Origin, connection limit) stay Tornado's and
the handler's; those after it (token, per-user limit) the session's: each is checked here on both
paths."""
import asyncio
import base64
import hashlib
import logging
import os
import socket
from typing import Dict, Optional, Tuple

import pytest

from conftest import make_token
from raw_client import HandshakeRefused, RawClient
from tornado_rt import RealtimeServer, transport
from tornado_rt.connection import RealtimeHandler

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.fixture(params=["lean", "tornado"])
def upgrade(request, monkeypatch):
    """Which upgrade serves the test: the lean one, or Tornado's own (the fallback)."""
    if request.param == "tornado":
        monkeypatch.setattr(transport.INTERNALS, "upgrade", False)
    return request.param


async def raw_request(port: int, request: bytes) -> Tuple[int, Dict[str, str], bytes, socket.socket]:
    """Send ``request`` as it is; the status, headers (lower-cased names) and the bytes after the
    head of the answer, and the socket (still open)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await loop.sock_recv(sock, 65536)
        assert chunk, f"connection closed before an answer: {buf!r}"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers, rest, sock


def upgrade_request(port: int, query: str = "", key: Optional[str] = None, version: str = "13",
                    extra: str = "", upgrade_header: str = "Upgrade: websocket\r\n",
                    connection: str = "Connection: Upgrade\r\n") -> bytes:
    key_line = "" if key == "" else f"Sec-WebSocket-Key: {key or base64.b64encode(os.urandom(16)).decode()}\r\n"
    return (f"GET /ws/core/{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{upgrade_header}{connection}"
            f"{key_line}Sec-WebSocket-Version: {version}\r\n{extra}\r\n").encode("latin-1")


@pytest.mark.gen_test
async def test_the_answer_is_rfc_6455s_and_the_authentication_message_follows(upgrade, server, http_server,
                                                                               http_port):
    key = base64.b64encode(os.urandom(16)).decode()
    status, headers, rest, sock = await raw_request(
        http_port, upgrade_request(http_port, f"?jwt_token={make_token(1)}", key=key))
    try:
        assert status == 101
        assert headers["upgrade"].lower() == "websocket" and headers["connection"].lower() == "upgrade"
        assert headers["sec-websocket-accept"] == base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        client = RawClient(sock, rest)
        message = await client.recv()
        assert message["type"] == "authentication" and message["success"] is True
        session = server.hub.connections[message["web_socket_id"]]
        assert session.transport.protocol.handshake is None  # queued once, never again
        assert type(session.transport.protocol) is transport.RealtimeProtocol
    finally:
        sock.close()


@pytest.mark.parametrize("case, status", [
    ("no upgrade header", 400), ("connection without upgrade", 400), ("no key", 400),
    ("version 8", 426)])
@pytest.mark.gen_test
async def test_malformed_upgrades_are_refused_before_it(upgrade, server, http_server, http_port, case, status):
    request = {
        "no upgrade header": upgrade_request(http_port, upgrade_header=""),
        "connection without upgrade": upgrade_request(http_port, connection="Connection: keep-alive\r\n"),
        "no key": upgrade_request(http_port, key=""),
        "version 8": upgrade_request(http_port, version="8"),
    }[case]
    got, headers, _, sock = await raw_request(http_port, request)
    sock.close()
    assert got == status
    if status == 426:
        assert headers["sec-websocket-version"] == "13"
    assert not server.hub.connections


@pytest.mark.rt_settings(allowed_origins=["https://baserow.example"])
@pytest.mark.gen_test
async def test_a_wrong_origin_is_refused_and_a_right_one_upgraded(upgrade, server, http_server, http_port):
    with pytest.raises(HandshakeRefused) as refused:
        await RawClient.connect(http_port, f"?jwt_token={make_token(1)}", headers="Origin: https://evil.example\r\n")
    assert refused.value.status == 403
    client = await RawClient.connect(http_port, f"?jwt_token={make_token(1)}",
                                     headers="Origin: https://baserow.example\r\n")
    assert (await client.recv())["success"] is True
    client.close()


@pytest.mark.rt_settings(max_connections=1)
@pytest.mark.gen_test
async def test_the_connection_limit_answers_503(upgrade, server, http_server, http_port):
    first = await RawClient.connect(http_port, f"?jwt_token={make_token(1)}")
    assert (await first.recv())["success"] is True
    with pytest.raises(HandshakeRefused) as refused:
        await RawClient.connect(http_port, f"?jwt_token={make_token(2)}")
    assert refused.value.status == 503
    first.close()


@pytest.mark.parametrize("token", ["missing", "bad signature", "expired", "malformed", "refresh"])
@pytest.mark.gen_test
async def test_refused_tokens_get_the_failed_authentication_and_4001(upgrade, server, http_server, http_port,
                                                                     token, caplog):
    query = {
        "missing": "",
        "bad signature": f"?jwt_token={make_token(1, secret='another-secret-0123456789abcdef-xyz')}",
        "expired": f"?jwt_token={make_token(1, lifetime=-60)}",
        "malformed": "?jwt_token=not.a.token",
        "refresh": f"?jwt_token={make_token(1, token_type='refresh')}",
    }[token]
    with caplog.at_level(logging.DEBUG):
        client = await RawClient.connect(http_port, query)
        message = await client.recv()
        assert message == {"type": "authentication", "success": False, "web_socket_id": None}
        assert await client.close_code() == 4001
    client.close()
    secret = query.partition("=")[2]
    for record in caplog.records:
        assert not secret or secret not in record.getMessage()
    assert not server.hub.connections


@pytest.mark.rt_settings(max_connections_per_user=1)
@pytest.mark.gen_test
async def test_a_user_over_the_limit_is_closed_with_1013(upgrade, server, http_server, http_port):
    first = await RawClient.connect(http_port, f"?jwt_token={make_token(3)}")
    assert (await first.recv())["success"] is True
    second = await RawClient.connect(http_port, f"?jwt_token={make_token(3)}")
    assert await second.close_code() == 1013
    second.close()
    first.close()


@pytest.mark.gen_test
async def test_the_access_line_names_the_upgrade_without_the_token(upgrade, server, http_server, http_port, caplog):
    token = make_token(1)
    with caplog.at_level(logging.INFO, logger="tornado.access"):
        client = await RawClient.connect(http_port, f"?jwt_token={token}")
        assert (await client.recv())["success"] is True
    lines = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert len(lines) == 1 and lines[0].startswith("101 GET /ws/core/?jwt_token=[redacted]")
    assert all(token not in r.getMessage() for r in caplog.records)
    client.close()


@pytest.mark.gen_test
async def test_a_subprotocol_offer_takes_tornados_upgrade_and_still_authenticates(server, http_server, http_port):
    status, headers, rest, sock = await raw_request(
        http_port, upgrade_request(http_port, f"?jwt_token={make_token(1)}", extra="Sec-WebSocket-Protocol: chat\r\n"))
    try:
        assert status == 101 and "sec-websocket-protocol" not in headers  # none selected, as before
        assert "sec-websocket-accept" in headers
        message = await RawClient(sock, rest).recv()
        assert message["success"] is True
    finally:
        sock.close()


class EarlyWriter(RealtimeHandler):
    """A subclass whose open() writes a frame of its own before tornado-rt's open() runs."""

    def open(self, *args, **kwargs):
        self.write_message('{"type":"hello"}')
        return super().open(*args, **kwargs)


class SilentOpen(RealtimeHandler):
    """A subclass whose open() never calls tornado-rt's (no session): the 101 still goes out."""

    def open(self, *args, **kwargs):
        return None


@pytest.fixture
def app(request):
    handler = getattr(request, "param", None)
    if handler is None:
        return request.getfixturevalue("server").make_app()
    srv = RealtimeServer(request.getfixturevalue("settings"), load_entry_points=False, handler_class=handler)
    srv.directory.set_workspace(1, [1])
    return srv.make_app()


@pytest.mark.parametrize("app", [EarlyWriter], indirect=True)
@pytest.mark.gen_test
async def test_a_frame_written_before_the_session_follows_the_101(upgrade, app, http_server, http_port):
    client = await RawClient.connect(http_port, f"?jwt_token={make_token(1)}")
    assert await client.recv() == {"type": "hello"}
    assert (await client.recv())["success"] is True
    client.close()


@pytest.mark.parametrize("app", [SilentOpen], indirect=True)
@pytest.mark.gen_test
async def test_an_open_that_queues_nothing_still_gets_the_101(upgrade, app, http_server, http_port):
    client = await RawClient.connect(http_port, f"?jwt_token={make_token(1)}")  # raises unless 101
    assert client.buf == b""  # nothing but the answer: no session, no authentication message
    client.close()
