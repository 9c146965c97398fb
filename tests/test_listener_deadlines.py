"""The guarded listener bounds every request head with its own deadline (one timer per head)
instead of Tornado's ``with_timeout`` around each head's read (transport.take_head_timeouts):
the first head within min(header_timeout, idle_timeout) of the accept, each later head of a
keep-alive connection within idle_timeout. Each behaviour is proven over real sockets both with
the listener's own deadlines and with Tornado's timeout kept (the fallback when its internals
differ), and the header_timeout counter counts only what it counted before."""
import logging

import pytest
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets
from tornado.tcpclient import TCPClient
from tornado.web import Application, RequestHandler

from tornado_rt import transport
from tornado_rt.listener import GuardedHTTPServer

WAIT = 30.0  # the bound of every wait for a condition


class Hello(RequestHandler):
    def get(self) -> None:
        self.write("hello")


@pytest.fixture(params=["own", "tornado"])
def mode(request, monkeypatch):
    if request.param == "tornado":  # Tornado's internals 'differ': its own head timeout stays
        monkeypatch.setattr(transport, "head_timeout_problems", lambda server: ["forced by the test"])
        monkeypatch.setattr(transport, "_head_timeouts_warned", True)
    return request.param


def start(**timeouts):
    server = GuardedHTTPServer(Application([("/", Hello)]), **timeouts)
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]


async def closed_by_server(stream) -> bool:
    """Whether the server closes the connection (EOF) within the bound, sending nothing."""
    try:
        data = await stream.read_until_close()  # bounded by the server's own deadline
    except StreamClosedError:
        data = b""
    return data == b""


REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_a_server_without_them_is_reported_once_and_keeps_tornados_timeout(caplog, monkeypatch):
    class StandIn:
        conn_params = None

    monkeypatch.setattr(transport, "_head_timeouts_warned", False)
    with caplog.at_level(logging.WARNING, logger="tornado_rt.transport"):
        assert transport.take_head_timeouts(StandIn()) is False
        assert transport.take_head_timeouts(StandIn()) is False
    assert transport.head_timeout_problems(StandIn()) == ["HTTPServer.conn_params.header_timeout is not a number"]
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "head timeout stays" in caplog.records[0].getMessage()


@pytest.mark.gen_test(timeout=WAIT)
async def test_tornados_timeout_is_kept_when_the_internals_differ(mode):
    server, _ = start(idle_timeout=42.0)
    try:
        assert server._own_idle is (mode == "own")
        assert server.conn_params.header_timeout == (None if mode == "own" else 42.0)
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=WAIT)
async def test_a_silent_connection_is_closed_at_the_header_timeout_and_counted(mode):
    server, port = start(header_timeout=0.2, idle_timeout=60.0)
    try:
        stream = await TCPClient().connect("127.0.0.1", port)
        assert await closed_by_server(stream)
        assert server.stats.header_timeouts == 1
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=WAIT)
async def test_a_first_head_is_also_bounded_by_a_shorter_idle_timeout_uncounted(mode):
    server, port = start(header_timeout=60.0, idle_timeout=0.2)
    try:
        stream = await TCPClient().connect("127.0.0.1", port)
        await stream.write(b"GET / HTTP/1.1\r\n")  # a head begun, never completed
        assert await closed_by_server(stream)
        assert server.stats.header_timeouts == 0  # Tornado's idle bound: never counted
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=WAIT)
async def test_a_keep_alive_connection_is_served_then_closed_at_the_idle_timeout(mode):
    server, port = start(header_timeout=60.0, idle_timeout=0.2)
    try:
        stream = await TCPClient().connect("127.0.0.1", port)
        for _ in range(2):  # each request answered; each later head gets its own deadline
            await stream.write(REQUEST)
            head = await stream.read_until(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert await stream.read_bytes(5) == b"hello"
        await stream.write(b"GET / HTTP/1.1\r\nHost: 127")  # the third head never completes
        assert await closed_by_server(stream)
        assert server.stats.header_timeouts == 0
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=WAIT)
async def test_an_answered_connection_is_not_cut_by_the_header_timeout(mode):
    """The first head's deadline ends with the head: a keep-alive connection that waits longer
    than header_timeout (but not idle_timeout) for its next request is still served."""
    server, port = start(header_timeout=0.2, idle_timeout=60.0)
    try:
        stream = await TCPClient().connect("127.0.0.1", port)
        await stream.write(REQUEST)
        await stream.read_until(b"\r\n\r\n")
        assert await stream.read_bytes(5) == b"hello"
        # A second, complete connection that the header deadline does close is the barrier:
        # it was accepted after the first's head, so its deadline fires after the first's would have.
        probe = await TCPClient().connect("127.0.0.1", port)
        assert await closed_by_server(probe)
        await stream.write(REQUEST)
        head = await stream.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert server.stats.header_timeouts == 1  # the probe only
    finally:
        server.stop()

