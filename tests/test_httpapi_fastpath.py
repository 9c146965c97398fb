"""``POST /api/publish``'s fast path (``httpapi.ApiApplication``), over real sockets.

The common request (an authorized POST of a JSON body with a small ``Content-Length``) is answered
without a ``RequestHandler``; everything else is handed to ``PublishHandler``. These tests send
raw HTTP/1.1 on a TCP connection to the served application and prove what that path re-implements:
the refusals at the head before any body byte is sent, chunked and segmented bodies, keep-alive
with pipelined requests (including a refused one, replayed into the handler, between two good
ones), a client that goes away mid-body, delivery to a real WebSocket client, the access log and
the metrics. ``api.fast_publishes`` shows which requests the fast path answered.
"""
import json
import logging
import socket

import pytest
from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

from conftest import make_token
from standalone import API_KEY
from tornado_rt.httpapi import make_app

LIMIT = 4096


@pytest.fixture
def app(server):
    return make_app(server, [API_KEY], max_body_size=LIMIT)


@pytest.fixture
def http_api(app):
    return app.http_api


def envelope(table_id=10, n=1):
    return {"message": {"type": "rows_created", "table_id": table_id, "rows": [{"id": n}],
                        "metadata": {}, "before_row_id": None}}


def head(length=None, key=API_KEY, path="/api/publish", extra=""):
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def request(body, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return head(len(data), **kwargs) + data


class Conn:
    """One raw HTTP/1.1 connection."""

    def __init__(self, stream):
        self.stream = stream

    @classmethod
    async def open(cls, port):
        stream = await TCPClient().connect("127.0.0.1", port)
        stream.set_nodelay(True)
        return cls(stream)

    async def send(self, data):
        await self.stream.write(data)

    async def response(self):
        """(status, headers dict with lower-case names, parsed JSON body)."""
        text = (await self.stream.read_until(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = text.strip().split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.stream.read_bytes(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, json.loads(body)

    async def closed(self):
        """Whether the server closes the connection with nothing more sent."""
        try:
            rest = await self.stream.read_until_close()
        except StreamClosedError:
            return True
        return rest == b""

    def close(self):
        self.stream.close()


def _opener(port):
    """A fixture body: ``open()`` connects to ``port``; every connection is closed at the end."""
    opened = []

    async def _open():
        c = await Conn.open(port)
        opened.append(c)
        return c
    yield _open
    for c in opened:
        c.close()


@pytest.fixture
def conn(http_server, http_port, io_loop):
    yield from _opener(http_port)


@pytest.mark.gen_test
async def test_common_publish_is_answered_and_delivered_to_a_websocket_client(conn, connect, server, http_api,
                                                                              barrier):
    ws = await connect(user_id=1)
    await ws.subscribe("table", table_id=10)
    other = await connect(user_id=2)
    c = await conn()
    await c.send(request(envelope(10, 7), extra=f"WebSocketId: {other.web_socket_id}\r\n"))
    status, headers, body = await c.response()
    assert (status, body) == (200, {"published": 1, "delivered": 1})
    assert headers["content-type"] == "application/json; charset=UTF-8"
    assert headers["cache-control"] == "no-store"
    assert "date" in headers and headers["server"].startswith("TornadoServer/")
    assert (await ws.recv())["rows"] == [{"id": 7}]
    await barrier(ws, other)  # nothing else arrived
    # the WebSocketId header skips the sender's connection
    await c.send(request({"message": {"type": "test_marker", "n": 0}, "to": {"all_users": True}},
                         extra=f"WebSocketId: {other.web_socket_id}\r\n"))
    assert (await c.response())[::2] == (200, {"published": 1, "delivered": 1})
    assert (await ws.recv()) == {"type": "test_marker", "n": 0}
    await barrier(ws, other)
    assert http_api.fast_publishes == 2


@pytest.mark.gen_test
@pytest.mark.parametrize("key", ["wrong-key", None])
async def test_401_at_the_head_before_any_body_byte(conn, server, http_api, key):
    c = await conn()
    await c.send(head(100, key=key))  # the body is never sent
    status, headers, body = await c.response()
    assert status == 401 and body["field"] is None and "API key" in body["error"]
    assert headers["www-authenticate"] == 'Bearer realm="tornado-rt"'
    assert await c.closed()
    assert server.stats()["messages_published"] == 0 and http_api.fast_publishes == 0


@pytest.mark.gen_test
@pytest.mark.parametrize("key", [API_KEY, "wrong-key"])
async def test_an_announced_body_over_the_limit_is_refused_before_it_is_sent(conn, server, key):
    c = await conn()
    await c.send(head(LIMIT + 1, key=key))  # not a byte of the body follows
    status, _, body = await c.response()
    assert status == (413 if key == API_KEY else 401), body  # the key is checked first
    assert await c.closed()
    assert server.stats()["messages_published"] == 0


@pytest.mark.gen_test
async def test_a_body_at_the_limit_is_published_one_over_is_refused(conn, server, http_api):
    text = json.dumps(envelope())
    c = await conn()
    await c.send(request((text + " " * (LIMIT - len(text))).encode()))
    assert (await c.response())[::2] == (200, {"published": 1, "delivered": 0})
    await c.send(request((text + " " * (LIMIT + 1 - len(text))).encode()))
    status, _, body = await c.response()
    assert status == 413 and body["field"] is None
    assert server.stats()["messages_published"] == 1 and http_api.fast_publishes == 1


@pytest.mark.gen_test
async def test_a_chunked_body_is_published_and_one_over_the_limit_refused(conn, server):
    data = json.dumps([envelope(10, 1), envelope(11, 2)]).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + 10]), data[i:i + 10]) for i in range(0, len(data), 10))
    c = await conn()
    await c.send(head(extra="Transfer-Encoding: chunked\r\n") + chunks + b"0\r\n\r\n")
    assert (await c.response())[::2] == (200, {"published": 2, "delivered": 0})
    big = b" " * 1000
    await c.send(head(extra="Transfer-Encoding: chunked\r\n") + b"".join(b"3e8\r\n%s\r\n" % big for _ in range(5)))
    status, _, body = await c.response()
    assert status == 413, body
    assert await c.closed()
    assert server.stats()["messages_published"] == 2


@pytest.mark.gen_test
async def test_a_body_in_many_small_segments(conn, server, http_api):
    data = json.dumps([envelope(10, 1), envelope(11, 2), envelope(10, 3)]).encode()
    c = await conn()
    await c.send(head(len(data)))
    for i in range(len(data)):  # one byte per write (TCP_NODELAY: one segment each)
        await c.send(data[i:i + 1])
    assert (await c.response())[::2] == (200, {"published": 3, "delivered": 0})
    assert server.stats()["messages_published"] == 3 and http_api.fast_publishes == 1


@pytest.mark.gen_test
async def test_pipelined_keep_alive_requests_are_answered_in_order_a_refused_one_between(conn, server, http_api):
    refused = [envelope(10, 1), {"message": {"type": "no_such_type"}}]
    c = await conn()
    await c.send(request(envelope(10, 1)) + request(refused) + request(b"{not json")
                 + request([envelope(11, 2), envelope(10, 3)]) + request(b"[]"))
    assert (await c.response())[::2] == (200, {"published": 1, "delivered": 0})
    status, headers, body = await c.response()  # refused in the body: replayed into PublishHandler
    assert (status, body["field"]) == (400, "[1].message.type"), body
    assert headers["content-type"] == "application/json; charset=UTF-8"
    status, _, body = await c.response()
    assert status == 400 and body["error"].startswith("the body is not valid JSON: ") and body["field"] is None
    assert (await c.response())[::2] == (200, {"published": 2, "delivered": 0})
    assert (await c.response())[::2] == (200, {"published": 0, "delivered": 0})
    assert server.stats()["messages_published"] == 3  # nothing of the refused batch
    assert http_api.fast_publishes == 3
    await c.send(request(envelope(10, 4)))  # the connection is still usable
    assert (await c.response())[::2] == (200, {"published": 1, "delivered": 0})


@pytest.mark.gen_test
async def test_other_methods_and_content_types_get_the_handlers_answers(conn, server, http_api):
    c = await conn()
    await c.send(b"PUT /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    status, headers, body = await c.response()
    assert status == 405 and headers["allow"] == "POST", body
    c = await conn()
    await c.send(request(envelope()).replace(b"application/json", b"text/plain"))
    status, _, body = await c.response()
    assert status == 415, body
    assert http_api.fast_publishes == 0 and server.stats()["messages_published"] == 0


@pytest.mark.gen_test
async def test_a_client_that_goes_away_mid_body_publishes_nothing(conn, server, http_api):
    data = json.dumps(envelope()).encode()
    c = await conn()
    await c.send(head(len(data)) + data[:len(data) // 2])
    c.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()  # an abortive close, half the body sent
    other = await conn()  # the server goes on serving
    await other.send(request(envelope(11, 2)))
    assert (await other.response())[::2] == (200, {"published": 1, "delivered": 0})
    assert server.stats()["messages_published"] == 1 and http_api.fast_publishes == 1


@pytest.mark.gen_test
async def test_the_access_log_names_the_request_without_credentials(conn, caplog):
    c = await conn()
    with caplog.at_level(logging.INFO, logger="tornado.access"):
        await c.send(request(envelope(), path="/api/publish?jwt_token=" + make_token(1)))
        assert (await c.response())[0] == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert len(lines) == 1 and lines[0].startswith("200 POST /api/publish?jwt_token="), lines
    assert make_token(1).split(".")[0] not in lines[0] and API_KEY not in lines[0]


@pytest.mark.gen_test
async def test_the_publish_latency_histogram_counts_each_envelope(conn, app, connect):
    ws = await connect(user_id=1)
    await ws.subscribe("table", table_id=10)
    c = await conn()
    await c.send(request([envelope(10, 1), envelope(10, 2), envelope(11, 3)]))
    assert (await c.response())[::2] == (200, {"published": 3, "delivered": 2})
    await ws.recv()
    await ws.recv()
    exposition = app.http_api.metrics.exposition().decode()
    assert "tornado_rt_publish_to_write_seconds_count 3.0" in exposition, exposition


# --- behind the GuardedHTTPServer that `tornado-rt serve` runs: the body_timeout ----------------------
# The fast path bounds the body with one loop timeout of its own (body_timeout) instead of Tornado's
# gen.with_timeout around the body read (a task per request); the bound and its log line stay.

BODY_TIMEOUT = 0.3


@pytest.fixture
def guarded_port(app, server, io_loop):
    from tornado_rt import listen
    guarded = listen(app, 0, "127.0.0.1", settings=server.settings.replace(body_timeout=BODY_TIMEOUT))
    yield guarded.ports[0]
    guarded.stop()


@pytest.fixture
def guarded_conn(guarded_port):
    yield from _opener(guarded_port)


@pytest.mark.gen_test
async def test_guarded_a_slow_body_on_the_fast_path_is_cut_off_at_the_body_timeout(guarded_conn, server,
                                                                                  http_api, caplog):
    data = json.dumps(envelope()).encode()
    c = await guarded_conn()
    with caplog.at_level(logging.INFO, logger="tornado.general"):
        await c.send(head(len(data)) + data[:10])  # the rest never comes
        assert await c.closed()
    lines = [r.getMessage() for r in caplog.records if r.name == "tornado.general"]
    assert "Timeout reading body from 127.0.0.1" in lines, lines
    assert server.stats()["messages_published"] == 0 and http_api.fast_publishes == 0
    other = await guarded_conn()  # the server goes on serving
    await other.send(request(envelope(11, 2)))
    assert (await other.response())[::2] == (200, {"published": 1, "delivered": 0})


@pytest.mark.gen_test
async def test_guarded_a_finished_request_leaves_no_body_deadline_behind(guarded_conn, server, http_api):
    c = await guarded_conn()
    data = request(envelope(10, 1))
    for i in range(0, len(data), 7):  # a body in segments, all within the deadline
        await c.send(data[i:i + 7])
    assert (await c.response())[::2] == (200, {"published": 1, "delivered": 0})
    await c.send(request(envelope(10, 2)) + request(b"{not json") + request(envelope(10, 3)))
    assert (await c.response())[::2] == (200, {"published": 1, "delivered": 0})
    assert (await c.response())[0] == 400  # replayed into PublishHandler
    assert (await c.response())[::2] == (200, {"published": 1, "delivered": 0})
    # Barrier: a slow body on another connection, sent after those requests ended, is cut off at
    # its deadline, later than any deadline of theirs; the first connection is still open after it.
    slow = await guarded_conn()
    await slow.send(head(100) + b'{"message"')
    assert await slow.closed()
    await c.send(request(envelope(10, 4)))
    assert (await c.response())[::2] == (200, {"published": 1, "delivered": 0})
    assert http_api.fast_publishes == 4 and server.stats()["messages_published"] == 4
