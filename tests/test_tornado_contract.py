"""The contract with Tornado's internals (issue 9 §3): everything tornado-rt relies on is checked
in tornado_rt/transport.py, and these tests fail loudly when a Tornado upgrade changes any of it.
When the internals differ, the server falls back to Tornado's public API with one warning, and
messages still arrive: proven over a real socket with the fallback forced."""
import logging
import socket

import pytest
import tornado
from tornado.iostream import IOStream
from tornado.web import Application
from tornado.websocket import WebSocketProtocol13

from conftest import make_token
from raw_client import PING, PONG, TEXT, RawClient, client_frame
from test_one_writer import assert_intact, fill_with_pongs, make_room, rows, stalled_client
from tornado_rt import RealtimeServer, transport
from tornado_rt.connection import RealtimeHandler


def test_the_tornado_version_is_one_we_have_tested():
    major, minor = tornado.version_info[:2]
    assert (6, 3) <= (major, minor) < (7, 0), f"Tornado {tornado.version}: check transport.py, then the pin"


def test_websocket_protocol_internals_are_as_expected():
    assert transport.protocol_problems() == []
    assert transport.INTERNALS.protocol is True
    # the frame writer we override is the one Tornado's pong and close go through
    import inspect
    source = inspect.getsource(WebSocketProtocol13._send_pong) + inspect.getsource(WebSocketProtocol13.close)
    assert source.count("self._write_frame(") == 2
    assert "self._write_frame(" in inspect.getsource(WebSocketProtocol13.write_ping)


@pytest.mark.gen_test
async def test_iostream_internals_are_as_expected():
    a, b = socket.socketpair()
    stream = IOStream(a)
    try:
        assert transport.stream_problems(stream) == []
        # the write indexes tell exactly how many bytes Tornado holds
        b.setblocking(False)
        await stream.write(b"x" * 10)
        assert stream._total_write_index == stream._total_write_done_index == 10
    finally:
        stream.close()
        b.close()


@pytest.mark.gen_test
async def test_a_live_connection_uses_the_internals(server, connect):
    client = await connect(user_id=1)
    session = server.hub.connections[client.web_socket_id]
    assert transport.INTERNALS.stream is True
    assert type(session.transport.protocol) is transport.RealtimeProtocol
    assert session.transport.sock is not None  # plain TCP: direct sends allowed
    stream = session.transport.stream
    assert type(stream._write_futures) is type(stream._write_buffer._buffers) is transport._SmallQueue


class StandIn:
    """An object lacking every internal (what a future Tornado could look like to the check)."""


def test_the_check_reports_a_stand_in_and_warns_once(caplog):
    assert len(transport.stream_problems(StandIn())) == 4
    assert len(transport.protocol_problems(StandIn)) == 2

    class Renamed(WebSocketProtocol13):
        def _write_frame(self, fin, opcode, data):  # a changed signature
            pass
    assert transport.protocol_problems(Renamed) == [
        "WebSocketProtocol13._write_frame takes ['self', 'fin', 'opcode', 'data']"]

    internals = transport.Internals()
    assert internals.protocol is True and internals.stream is None
    with caplog.at_level(logging.WARNING, logger="tornado_rt.transport"):
        assert internals.check_stream(StandIn()) is False
        assert internals.check_stream(StandIn()) is False
    warnings = [r for r in caplog.records if r.name == "tornado_rt.transport"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "public API" in warnings[0].getMessage()


@pytest.fixture
def fallback(monkeypatch):
    """Run the server as if Tornado's internals had changed (the check said so)."""
    monkeypatch.setattr(transport.INTERNALS, "protocol", False)
    monkeypatch.setattr(transport.INTERNALS, "stream", False)


@pytest.mark.gen_test(timeout=60)
async def test_messages_arrive_with_the_fallback(fallback, server, connect, barrier):
    clients = [await connect(user_id=u) for u in (1, 2)]
    for c in clients:
        await c.subscribe("table", table_id=10)
    session = server.hub.connections[clients[0].web_socket_id]
    assert type(session.transport.protocol) is transport.PublicProtocol
    assert session.transport.sock is None  # no direct sends
    assert session.transport.stream.max_write_buffer_size == server.settings.max_outgoing_buffer
    assert type(session.transport.stream._write_futures).__name__ == "deque"  # left as it is
    sent = [rows(n) for n in range(200)]
    for msg in sent:
        server.publish(msg)
    for c in clients:
        for msg in sent:
            assert await c.recv() == msg
    await barrier(*clients)
    server.disconnect([2])
    assert await clients[1].recv() == {"type": "force_disconnect"}
    assert await clients[1].expect_close() == 4003


@pytest.mark.gen_test(timeout=60)
async def test_pong_and_publish_stay_intact_with_the_fallback(fallback, server, http_server, http_port):
    raw, protocol, stream = await stalled_client(server, http_port)
    await fill_with_pongs(raw, protocol, stream)
    make_room(raw, stream.socket)
    server.publish(rows(1))
    frames = []
    while not frames or frames[-1][0] != TEXT:
        frames.append(await raw.recv_frame())
        assert_intact(frames[-1:])
    assert [f[0] for f in frames[:-1]] == [PONG] * (len(frames) - 1)
    raw.close()


# --- subclassing the handler ------------------------------------------------------------------------

SEEN = []


class TaggingHandler(RealtimeHandler):
    """A subclass, as the docs allow: it records the frames its connections receive."""

    def on_message(self, message):
        SEEN.append(message)
        return super().on_message(message)


@pytest.fixture
def app(request):
    if "subclass_server" in request.fixturenames:
        return request.getfixturevalue("subclass_server").make_app()
    return request.getfixturevalue("server").make_app([("/boom", Boom)])


class Boom(transport.RedactedSummary):
    """A handler on tornado-rt's shared base that fails before any of its own code runs."""

    def prepare(self) -> None:
        raise RuntimeError("boom")


@pytest.fixture
def subclass_server(settings):
    return RealtimeServer(settings, load_entry_points=False, handler_class=TaggingHandler)


@pytest.mark.gen_test
async def test_handler_class_serves_the_endpoint(subclass_server, http_server, http_port):
    SEEN.clear()
    subclass_server.directory.set_workspace(1, [1])
    subclass_server.directory.set_table(10, 1)
    raw = await RawClient.connect(http_port, f"?jwt_token={make_token(1)}")
    assert (await raw.recv())["success"] is True
    await raw.send({"page": "table", "table_id": 10})
    assert (await raw.recv())["type"] == "page_add"
    assert SEEN == ['{"page":"table","table_id":10}']
    await raw.send_raw(client_frame(b"hi", PING))
    assert await raw.recv_frame() == (PONG, b"hi")
    subclass_server.publish(rows(1))
    assert await raw.recv() == rows(1)
    (session,) = subclass_server.hub.connections.values()
    assert type(session.transport.handler) is TaggingHandler
    raw.close()


def test_handler_class_must_be_a_realtime_handler():
    with pytest.raises(TypeError, match="handler_class"):
        RealtimeServer(load_entry_points=False, handler_class=Application)


def test_tcp_server_internals_the_listener_relies_on_are_as_expected():
    from tornado_rt.listener import GuardedHTTPServer
    assert transport.tcp_server_problems(GuardedHTTPServer(Application())) == []


def test_the_head_timeout_internals_are_as_expected():
    from tornado.httpserver import HTTPServer

    from tornado_rt.listener import GuardedHTTPServer

    plain = HTTPServer(Application(), idle_connection_timeout=7.0)
    assert transport.head_timeout_problems(plain) == []
    guarded = GuardedHTTPServer(Application())
    assert guarded._own_idle is True
    assert guarded.conn_params.header_timeout is None  # no with_timeout per head any more


def test_a_tcp_server_without_them_is_reported_once(caplog):
    class StandIn:
        _sockets: dict = {}

    transport._listener_warned = False
    with caplog.at_level(logging.WARNING, logger="tornado_rt.transport"):
        assert transport.can_adopt_listeners(StandIn()) is False
        assert transport.can_adopt_listeners(StandIn()) is False
    problems = transport.tcp_server_problems(StandIn())
    assert problems == ["TCPServer._handlers is not a dict", "TCPServer._handle_connection is missing"]
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "own loop" in caplog.records[0].getMessage()


@pytest.mark.gen_test
async def test_the_listener_falls_back_to_tornados_accept_loop_and_still_serves(caplog):
    """With the TCPServer internals 'changed' (a dict subclass where a dict is expected), the
    guarded server accepts with Tornado's own loop: a real HTTP request is still answered."""
    import collections

    from tornado.httpclient import AsyncHTTPClient
    from tornado.netutil import bind_sockets
    from tornado.web import RequestHandler

    from tornado_rt.listener import GuardedHTTPServer

    class Hello(RequestHandler):
        def get(self) -> None:
            self.write("hello")

    server = GuardedHTTPServer(Application([("/", Hello)]))
    server._handlers = collections.OrderedDict()
    transport._listener_warned = False
    sockets = bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    with caplog.at_level(logging.WARNING, logger="tornado_rt.transport"):
        server.add_sockets(sockets)
    try:
        assert any("own loop" in r.getMessage() for r in caplog.records)
        assert server.ports == [port]  # recorded by the listener itself, whichever loop accepts
        response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/")
        assert response.body == b"hello"
    finally:
        server.stop()


def test_the_guarded_listener_reports_its_ports_and_forgets_them_on_stop():
    from tornado.netutil import bind_sockets

    from tornado_rt.listener import GuardedHTTPServer

    server = GuardedHTTPServer(Application())
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    assert server.ports == [sockets[0].getsockname()[1]]
    server.stop()
    assert server.ports == []


def test_request_summary_internals_are_as_expected():
    """Tornado's access log and uncaught-exception log are built with _request_summary(), which
    tornado-rt's handlers override to redact jwt_token: a Tornado that stops calling it fails here."""
    assert transport.handler_problems() == []
    assert transport.HANDLER_SUMMARY is True
    from tornado_rt.httpapi import ApiHandler
    for cls in (RealtimeHandler, ApiHandler):
        assert cls._request_summary is transport.RedactedSummary._request_summary


def test_a_handler_without_the_summary_is_reported(caplog, monkeypatch):
    class NoSummary:
        def log_exception(self):
            pass

    assert transport.handler_problems(NoSummary) == ["RequestHandler._request_summary is missing"]

    class Quiet:
        def _request_summary(self):
            return ""

        def log_exception(self):
            pass

    class App:
        def log_request(self, handler):
            pass

    assert transport.handler_problems(Quiet, App) == [
        "App.log_request does not call _request_summary()",
        "Quiet.log_exception does not call _request_summary()"]
    monkeypatch.setattr(transport, "handler_problems", lambda: ["RequestHandler._request_summary is missing"])
    with caplog.at_level(logging.WARNING, logger="tornado_rt.transport"):
        assert transport.check_handler() is False
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "unredacted" in caplog.records[0].getMessage()


@pytest.mark.gen_test
async def test_tornados_own_log_lines_show_the_redacted_summary(caplog):
    """Tornado's access log (Application.log_request) and its uncaught-exception log
    (RequestHandler.log_exception) name the request through RedactedSummary: no jwt_token."""
    import sys

    from tornado.http1connection import HTTP1Connection
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

    token = make_token(1)
    a, b = socket.socketpair()
    stream = IOStream(a)
    try:
        request = HTTPServerRequest(
            connection=HTTP1Connection(stream, False), headers=HTTPHeaders({"Host": "example.com"}),
            start_line=RequestStartLine("GET", f"/ws/core/?jwt_token={token}", "HTTP/1.1"))
        app = Application()
        handler = transport.RedactedSummary(app, request)
        with caplog.at_level(logging.INFO):
            app.log_request(handler)
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                handler.log_exception(*sys.exc_info())
    finally:
        stream.close()
        b.close()
    lines = [r.getMessage() for r in caplog.records if r.name in ("tornado.access", "tornado.application")]
    assert len(lines) == 2
    for line in lines:  # (the exception log's own request repr, on the next line, is Tornado's)
        summary = line.splitlines()[0]
        assert "GET /ws/core/?jwt_token=[redacted]" in summary and token not in summary


@pytest.mark.gen_test
async def test_an_uncaught_exception_before_the_upgrade_never_logs_the_token(http_server, http_port, caplog):
    """Tornado's own uncaught-exception line prints ``repr(request)``, whose URI still holds the
    ``jwt_token`` before the handler redacts it: ours names the request by its redacted summary."""
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError

    token = make_token(1)
    with caplog.at_level(logging.ERROR):
        with pytest.raises(HTTPClientError) as failed:
            await AsyncHTTPClient().fetch(f"http://127.0.0.1:{http_port}/boom?jwt_token={token}")
    assert failed.value.code == 500
    lines = [r for r in caplog.records if "Uncaught exception" in r.getMessage()]
    assert len(lines) == 1 and "jwt_token=[redacted]" in lines[0].getMessage()
    for record in caplog.records:
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        assert token not in text


def test_the_upgrade_internals_are_as_expected():
    """The lean upgrade replaces WebSocketProtocol13._accept_connection(handler) and uses the public
    compute_accept_value, start_pinging and RequestHandler.detach (tests/test_lean_upgrade.py runs
    every answer with it and with Tornado's own)."""
    assert transport.upgrade_problems() == []
    assert transport.INTERNALS.upgrade is True
    import inspect
    source = inspect.getsource(WebSocketProtocol13.accept_connection)
    assert "self._accept_connection(handler)" in source  # the call our override answers
    assert transport.upgrade_problems(StandIn, StandIn) == [
        "WebSocketProtocol13._accept_connection is not a coroutine of []",
        "missing: compute_accept_value, start_pinging, RequestHandler.detach"]

    class Changed(WebSocketProtocol13):
        async def _accept_connection(self, handler, subprotocols):  # a changed signature
            pass
    assert transport.upgrade_problems(Changed) == [
        "WebSocketProtocol13._accept_connection is not a coroutine of ['self', 'handler', 'subprotocols']"]


def test_a_changed_upgrade_is_reported_once_and_falls_back(caplog, monkeypatch):
    monkeypatch.setattr(transport, "upgrade_problems", lambda: ["WebSocketProtocol13._accept_connection differs"])
    with caplog.at_level(logging.WARNING, logger="tornado_rt.transport"):
        internals = transport.Internals()
    assert internals.upgrade is False and internals.protocol is True
    warnings = [r.getMessage() for r in caplog.records if r.name == "tornado_rt.transport"]
    assert len(warnings) == 1 and "own WebSocket upgrade" in warnings[0]
