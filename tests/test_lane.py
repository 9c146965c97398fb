"""The connect lane of the guarded listener (GuardedHTTPServer, ``lane=True``): the first request
head of a connection is read by the listener, and the common WebSocket upgrade is run without
Tornado's HTTP/1 request loop and routing; everything else is put back and served by Tornado.

Every case runs against two real servers in the same loop, one with the lane and one without,
over real sockets; the answers (status, headers except Date, body; for an upgrade the accept key
and the first message) must be the same, and the lane's counters say which requests it took.
"""
import asyncio
import base64
import email.utils
import hashlib
import logging
import os
import re
import socket
import struct
from typing import Any, Dict, List, Optional, Tuple

import pytest
import ujson
from tornado.iostream import IOStream

from conftest import SECRET, make_token
from raw_client import PING, PONG, client_frame
from tornado_rt import RealtimeServer, Settings, listen, transport
from tornado_rt.connection import RealtimeHandler
from tornado_rt.httpapi import make_app

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
API_KEY = "lane-test-key"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key: the accept value is fixed
WAIT = 30.0


class Front:
    """One real server: a RealtimeServer, the HTTP API app, a GuardedHTTPServer on a free port."""

    def __init__(self, lane: bool, rt: Dict[str, Any], listener: Dict[str, Any], handler_class: type,
                 authenticator: Any = None):
        self.rt = RealtimeServer(Settings(jwt_secret=SECRET, ping_interval=0, **rt), load_entry_points=False,
                                 handler_class=handler_class, authenticator=authenticator)
        kwargs = dict(listener)
        self.http = listen(make_app(self.rt, [API_KEY]), 0, "127.0.0.1",
                           settings=Settings(**kwargs.pop("settings", {})), lane=lane, **kwargs)
        self.port = self.http.ports[0]

    @property
    def stats(self):
        return self.http.stats

    def stop(self) -> None:
        self.http.stop()


@pytest.fixture
def fronts(io_loop):
    """``make(**kw)`` -> (with lane, without lane); both stopped at the end."""
    made: List[Front] = []

    def make(rt: Optional[Dict[str, Any]] = None, listener: Optional[Dict[str, Any]] = None,
             handler_class: type = RealtimeHandler, authenticator: Any = None) -> Tuple[Front, Front]:
        pair = (Front(True, rt or {}, listener or {}, handler_class, authenticator),
                Front(False, rt or {}, listener or {}, handler_class, authenticator))
        made.extend(pair)
        return pair

    yield make
    for front in made:
        front.stop()


# --- a raw client -----------------------------------------------------------------------------------

async def open_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def recv(sock: socket.socket) -> bytes:
    """One read; b"" at EOF or a reset (the server closed with bytes of ours unread)."""
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 65536), WAIT)
    except ConnectionResetError:
        return b""


class Reader:
    def __init__(self, sock: socket.socket, buf: bytes = b""):
        self.sock = sock
        self.buf = buf

    async def need(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = await recv(self.sock)
            if not chunk:
                return False
            self.buf += chunk
        return True

    async def head(self) -> Optional[bytes]:
        while b"\r\n\r\n" not in self.buf:
            chunk = await recv(self.sock)
            if not chunk:
                assert not self.buf, f"closed in the middle of a head: {self.buf!r}"
                return None
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head

    async def take(self, n: int) -> bytes:
        assert await self.need(n), "closed in the middle of a message"
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    async def frame(self) -> Tuple[int, bytes]:
        first, second = await self.take(2)
        n = second & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.take(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.take(8))[0]
        return first & 0x0F, await self.take(n)

    async def eof(self) -> bool:
        return not self.buf and not await recv(self.sock)


async def response(reader: Reader) -> Optional[Dict[str, Any]]:
    """The next answer, normalized: status, headers (lower-case names, Date left out), body; for a
    101 the first message (its web_socket_id left out). None: closed without an answer."""
    head = await reader.head()
    if head is None:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "date":  # the time differs; its form must not
            assert email.utils.format_datetime(email.utils.parsedate_to_datetime(value.strip()),
                                               usegmt=True) == value.strip()
            value = "(a date)"
        headers[name.strip().lower()] = value.strip()
    answer: Dict[str, Any] = {"start": lines[0], "status": status, "headers": headers}
    if status == 101:
        opcode, payload = await reader.frame()
        if opcode == 1:
            message = ujson.loads(payload)
            message.pop("web_socket_id", None)
            answer["message"] = (opcode, message)
        else:
            answer["message"] = (opcode, payload)
    else:
        answer["body"] = await reader.take(int(headers.get("content-length", "0")))
    return answer


async def exchange(port: int, *parts: bytes, between=None) -> Tuple[Optional[Dict[str, Any]], Reader]:
    """Send ``parts`` (one write each; ``between()`` awaited between two), read one answer."""
    sock = await open_socket(port)
    loop = asyncio.get_running_loop()
    for i, part in enumerate(parts):
        if i and between is not None:
            await between()
        await loop.sock_sendall(sock, part)
    reader = Reader(sock)
    return await response(reader), reader


async def both(pair, *parts: bytes, between=None) -> Dict[str, Any]:
    """The same exchange with each server of ``pair``: the answers must be the same."""
    answers = []
    for front in pair:
        answer, reader = await exchange(front.port, *parts, between=between)
        answers.append((answer, await reader.eof() if answer is None else None))
        reader.sock.close()
    assert answers[0] == answers[1]
    return answers[0][0]


def upgrade(port: int, path: str = "/ws/core/", token: Optional[str] = None, key: Optional[str] = KEY,
            version: str = "13", extra: str = "", upgrade_header: str = "websocket",
            connection: str = "Upgrade", host: Optional[str] = None) -> bytes:
    query = f"?jwt_token={token or make_token(1)}"
    lines = [f"GET {path}{query} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
    if upgrade_header:
        lines.append(f"Upgrade: {upgrade_header}")
    lines.append(f"Connection: {connection}")
    if key:
        lines.append(f"Sec-WebSocket-Key: {key}")
    lines.append(f"Sec-WebSocket-Version: {version}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


def accept(key: str = KEY) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def counts(front: Front) -> Tuple[int, int]:
    return front.stats.lane_upgrades, front.stats.lane_fallbacks


# The Host header carries the port, which differs between the two servers: upgrade requests are
# built per server, so `both` takes a function of the port for them.
async def both_upgrade(pair, **kw) -> Dict[str, Any]:
    answers = []
    for front in pair:
        answer, reader = await exchange(front.port, upgrade(front.port, **kw))
        answers.append((answer, await reader.eof() if answer is None else None))
        reader.sock.close()
    assert answers[0] == answers[1]
    return answers[0][0]


# --- the tests ------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_an_upgrade_is_taken_by_the_lane_and_answered_as_tornado_answers_it(fronts):
    pair = fronts()
    answer = await both_upgrade(pair)
    assert answer["status"] == 101 and answer["headers"]["sec-websocket-accept"] == accept()
    assert answer["headers"]["upgrade"] == "websocket" and answer["headers"]["connection"] == "Upgrade"
    assert answer["message"] == (1, {"type": "authentication", "success": True})
    assert counts(pair[0]) == (1, 0) and counts(pair[1]) == (0, 0)
    # Counted as connected once it opened, by both; nothing left unauthenticated.
    assert pair[0].rt.counters.connections_opened == pair[1].rt.counters.connections_opened == 1
    assert pair[0].http.unauthenticated_count() == pair[1].http.unauthenticated_count() == 0


@pytest.mark.parametrize("case, status", [
    ("no key", 400), ("no upgrade header", 400), ("connection without upgrade", 400),
    ("version 8", 426), ("a subprotocol offer", 101), ("an invalid host", 400)])
@pytest.mark.gen_test
async def test_refusals_before_the_upgrade_are_tornados(fronts, case, status):
    pair = fronts()
    kw = {"no key": {"key": None}, "no upgrade header": {"upgrade_header": ""},
          "connection without upgrade": {"connection": "keep-alive"}, "version 8": {"version": "8"},
          "a subprotocol offer": {"extra": "Sec-WebSocket-Protocol: chat\r\n"},
          "an invalid host": {"host": "bad host"}}[case]
    answer = await both_upgrade(pair, **kw)
    assert answer["status"] == status
    if case == "an invalid host":  # Tornado's bare answer to a malformed request
        assert answer["start"] == "HTTP/1.1 400 Bad Request" and answer["headers"] == {}
    elif status != 101:  # the handler's headers (RealtimeHandler.clear): Tornado's
        assert answer["headers"]["server"].startswith("TornadoServer/") and answer["headers"]["date"]
    assert counts(pair[0]) == (0, 1)  # read by the lane, served by Tornado


@pytest.mark.gen_test
async def test_origins_allowed_are_laned_and_refused_ones_get_tornados_403(fronts, caplog):
    pair = fronts(rt={"allowed_origins": ["https://baserow.example"]})
    ok = await both_upgrade(pair, extra="Origin: https://baserow.example\r\n")
    assert ok["status"] == 101
    with caplog.at_level(logging.INFO):
        refused = await both_upgrade(pair, extra="Origin: https://evil.example\r\n")
    assert refused["status"] == 403
    assert counts(pair[0]) == (1, 1)
    lines = [re.sub(r":\d+'", "'", r.getMessage()) for r in caplog.records if "evil.example" in r.getMessage()]
    assert len(lines) == 2 and lines[0] == lines[1]  # one refusal line per server, the same

    # Without allowed_origins: an Origin naming the Host is laned, another is Tornado's 403.
    plain = fronts()
    for front in plain:  # the Host (with the port) is the origin's host
        answer, reader = await exchange(front.port, upgrade(front.port, extra=f"Origin: http://127.0.0.1:{front.port}\r\n"))
        assert answer["status"] == 101
        reader.sock.close()
    assert (await both_upgrade(plain, extra="Origin: http://elsewhere.example\r\n"))["status"] == 403
    assert (await both_upgrade(plain, extra="Sec-Fetch-Site: cross-site\r\n"))["status"] == 403
    assert (await both_upgrade(plain, extra="Sec-Fetch-Site: same-origin\r\n"))["status"] == 101
    assert counts(plain[0]) == (2, 2)


@pytest.mark.gen_test
async def test_another_path_is_tornados_404_and_a_body_on_the_upgrade_its_413(fronts):
    pair = fronts()
    answer = await both_upgrade(pair, path="/ws/other/")
    assert answer["status"] == 404 and b"no such endpoint" in answer["body"]
    answer = await both_upgrade(pair, extra="Content-Length: 5\r\n")
    assert answer["status"] == 413 and ujson.loads(answer["body"])["field"] == "Content-Length"
    assert pair[0].stats.bodies_refused == pair[1].stats.bodies_refused == 1
    # Both paths without the slash, and a POST, behave alike too.
    assert (await both_upgrade(pair, path="/ws/core"))["status"] == 101
    post = b"POST /ws/core/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    assert (await both(pair, post))["status"] == 405
    assert counts(pair[0]) == (1, 3)


@pytest.mark.gen_test
async def test_the_connection_limit_answers_tornados_503(fronts):
    pair = fronts(rt={"max_connections": 1})
    held = []
    for front in pair:
        answer, reader = await exchange(front.port, upgrade(front.port))
        assert answer["status"] == 101
        held.append(reader.sock)
    answer = await both_upgrade(pair)
    assert answer["status"] == 503 and b"connection limit" in answer["body"]
    assert counts(pair[0]) == (1, 1)
    for sock in held:
        sock.close()


@pytest.mark.gen_test
async def test_the_address_cap_counts_until_the_upgrade(fronts):
    pair = fronts(listener={"settings": {"max_unauthenticated_per_address": 1}})
    for front in pair:
        first = await open_socket(front.port)  # holds the one unauthenticated slot
        over, _ = await exchange(front.port, upgrade(front.port))
        assert over is None  # closed at accept, no answer
        assert front.stats.refused["address_limit"] == 1
        # A request the lane leaves to Tornado (426) keeps counting, its connection open.
        reader = Reader(first)
        await asyncio.get_running_loop().sock_sendall(first, upgrade(front.port, version="8"))
        assert (await response(reader))["status"] == 426
        over, _ = await exchange(front.port, upgrade(front.port))
        assert over is None and front.stats.refused["address_limit"] == 2
        # Once upgraded (its second request, Tornado's) it no longer counts (Tornado releases it
        # when its HTTP connection ends, a few loop turns after the 101): another upgrade fits.
        await asyncio.get_running_loop().sock_sendall(first, upgrade(front.port))
        assert (await response(reader))["status"] == 101
        for _ in range(1000):  # barrier-ok: bounded wait for the release
            if front.http.unauthenticated_count() == 0:
                break
            await asyncio.sleep(0.005)  # barrier-ok
        assert front.http.unauthenticated_count() == 0
        second, second_reader = await exchange(front.port, upgrade(front.port))
        assert second["status"] == 101
        first.close()
        second_reader.sock.close()
    assert pair[0].stats.refused == pair[1].stats.refused
    assert counts(pair[0]) == (1, 1) and counts(pair[1]) == (0, 0)


@pytest.mark.gen_test
async def test_a_slow_head_is_cut_at_the_header_timeout_on_both(fronts):
    pair = fronts(listener={"settings": {"header_timeout": 0.3}})
    answer = await both(pair, b"GET /ws/core/ HTTP/1.1\r\nHost: x\r\n")  # never completed
    assert answer is None
    assert pair[0].stats.header_timeouts == pair[1].stats.header_timeouts == 1
    assert pair[0].http.unauthenticated_count() == pair[1].http.unauthenticated_count() == 0
    assert counts(pair[0]) == (0, 0)


@pytest.mark.gen_test
async def test_a_head_in_many_small_writes_is_still_laned(fronts):
    pair = fronts()

    for front in pair:
        async def round_trip(port=front.port):  # the server has run loop turns since the last write
            answer, reader = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer["status"] == 200
            reader.sock.close()

        data = upgrade(front.port)
        parts = [data[i:i + 7] for i in range(0, len(data), 7)]
        answer, reader = await exchange(front.port, *parts, between=round_trip)
        assert answer["status"] == 101 and answer["headers"]["sec-websocket-accept"] == accept()
        assert answer["message"] == (1, {"type": "authentication", "success": True})
        reader.sock.close()
    assert pair[0].stats.lane_upgrades == 1


@pytest.mark.gen_test
async def test_a_head_over_the_limit_is_closed_as_by_tornado(fronts):
    pair = fronts(listener={"max_header_size": 1024})
    big = upgrade(0, extra="X-Filler: " + "a" * 2000 + "\r\n")
    answer = await both(pair, big)
    assert answer is None  # Tornado closes an unsatisfiable read without an answer
    assert pair[0].http.unauthenticated_count() == pair[1].http.unauthenticated_count() == 0
    # Just under the limit, it is laned.
    assert (await both_upgrade(pair, extra="X-Filler: " + "a" * 500 + "\r\n"))["status"] == 101
    assert counts(pair[0]) == (1, 0)


@pytest.mark.gen_test
async def test_a_frame_sent_with_the_head_is_read_as_a_frame(fronts):
    pair = fronts()
    frames = []
    for front in pair:
        front.rt.directory.set_workspace(1, [1])
        front.rt.directory.set_table(10, 1)
        ping = client_frame(b"hello", opcode=PING)
        subscribe = client_frame(ujson.dumps({"page": "table", "table_id": 10}).encode())
        answer, reader = await exchange(front.port, upgrade(front.port) + ping + subscribe)
        assert answer["status"] == 101 and answer["message"][1]["success"] is True
        got = [await reader.frame(), await reader.frame()]
        frames.append((answer, got))
        reader.sock.close()
    assert frames[0] == frames[1]
    answer, got = frames[0]
    assert got[0] == (PONG, b"hello")
    assert got[1][0] == 1 and ujson.loads(got[1][1]) == {"type": "page_add", "page": "table",
                                                         "parameters": {"table_id": 10}}
    assert pair[0].stats.lane_upgrades == 1


@pytest.mark.gen_test
async def test_other_requests_fall_back_and_keep_alive_stays_tornados(fronts):
    pair = fronts()
    results = []
    for front in pair:
        sock = await open_socket(front.port)
        loop = asyncio.get_running_loop()
        reader = Reader(sock)
        await loop.sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await response(reader)
        await loop.sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        second = await response(reader)
        # and a third pipelined with a fourth in one write
        await loop.sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        third, fourth = await response(reader), await response(reader)
        results.append((first, second, third, fourth))
        sock.close()
    assert results[0] == results[1]
    assert all(r["status"] == 200 for r in results[0])
    assert counts(pair[0]) == (0, 1)  # only the first request of the connection passes the lane

    # A head and its pipelined successor in one write: the lane puts both back.
    answers = []
    for front in pair:
        answer, reader = await exchange(front.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                                                    b"GET /ws/other HTTP/1.1\r\nHost: x\r\n\r\n")
        answers.append((answer, await response(reader)))
        reader.sock.close()
    assert answers[0] == answers[1] and answers[0][1]["status"] == 404


@pytest.mark.gen_test
async def test_the_access_line_is_the_same_and_redacted(fronts, caplog):
    pair = fronts()
    token = make_token(7)
    with caplog.at_level(logging.INFO, logger="tornado.access"):
        await both_upgrade(pair, token=token)
        await both_upgrade(pair, token=token, version="8")
    lines = [re.sub(r" [0-9.]+ms$", "", r.getMessage()) for r in caplog.records if r.name == "tornado.access"]
    assert len(lines) == 4 and lines[0] == lines[1] and lines[2] == lines[3]
    assert lines[0].startswith("101 GET /ws/core/?jwt_token=") and lines[2].startswith("426 ")
    assert all(token not in line for line in lines)


@pytest.mark.gen_test
async def test_refusals_after_the_upgrade_stay_the_sessions(fronts):
    pair = fronts(rt={"max_connections_per_user": 1})
    bad = await both_upgrade(pair, token="not-a-token")
    assert bad["status"] == 101 and bad["message"][1]["success"] is False
    held = []
    for front in pair:
        answer, reader = await exchange(front.port, upgrade(front.port, token=make_token(5)))
        held.append(reader)
    answers = []
    for front in pair:
        answer, reader = await exchange(front.port, upgrade(front.port, token=make_token(5)))
        answers.append(answer)
        reader.sock.close()
    assert answers[0] == answers[1]
    opcode, payload = answers[0]["message"]
    assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1013
    for reader in held:
        reader.sock.close()


class Compressing(RealtimeHandler):
    def get_compression_options(self):  # a handler deciding differently: not laned
        return None


@pytest.mark.gen_test
async def test_no_lane_where_it_could_differ(fronts):
    pair = fronts(handler_class=Compressing)
    assert (await both_upgrade(pair))["status"] == 101
    assert counts(pair[0]) == (0, 0)
    proxied = fronts(rt={"trusted_proxies": ["127.0.0.1"]}, listener={"settings": {"trusted_proxies": ["127.0.0.1"]}})
    assert (await both_upgrade(proxied))["status"] == 101
    assert counts(proxied[0]) == (0, 0)


class Recording(RealtimeHandler):
    """Records the request as open() sees it (after RealtimeHandler.get took the token out)."""

    seen: List[Dict[str, Any]] = []

    def open(self, *args, **kwargs):
        request = self.request
        self.seen.append({name: getattr(request, name) for name in (
            "method", "uri", "version", "path", "query", "arguments", "query_arguments", "body_arguments",
            "files", "body", "host", "host_name", "remote_ip", "protocol")})
        self.seen[-1]["headers"] = sorted(request.headers.get_all())
        return super().open(*args, **kwargs)


@pytest.mark.parametrize("query", [
    "", "&positions=1", "&x=1&x=2&blank=&y=%41%20b+c", "&positions=0&&=v&k", "&caf%C3%A9=%FF",
])
@pytest.mark.gen_test
async def test_the_lanes_request_is_the_one_tornado_builds(fronts, query):
    """The lane builds the request itself (lane_request: the query's arguments copied without
    copy.deepcopy, the headers built at once): what the handler sees is what Tornado gives it,
    repeated and blank arguments, percent-escapes and no query at all included."""
    Recording.seen = []
    pair = fronts(handler_class=Recording)
    path = "/ws/core/" if query else "/ws/core/?"
    answers = []
    for front in pair:
        token = make_token(1) if query or front is pair[0] else make_token(1)
        request = upgrade(front.port, token=token).replace(b"?jwt_token=" + token.encode(),
                                                          b"?jwt_token=" + token.encode() + query.encode())
        answer, reader = await exchange(front.port, request)
        answers.append(answer)
        reader.sock.close()
    assert answers[0] == answers[1] and answers[0]["status"] == 101
    assert counts(pair[0]) == (1, 0)
    lane, tornado = Recording.seen
    # the Host header carries each server's own port
    for seen, front in ((lane, pair[0]), (tornado, pair[1])):
        assert seen["host"] == f"127.0.0.1:{front.port}"
        seen["headers"] = [h for h in seen["headers"] if h[0] != "Host"]
        seen["host"] = None
    assert lane == tornado
    assert lane["uri"].startswith(path) and "jwt_token" not in lane["arguments"]


@pytest.mark.gen_test
async def test_an_upgrade_whose_open_waits_is_laned_and_answered_the_same(fronts):
    """An authenticator that answers later: the lane's first step of the handler stops at it
    (transport.execute hands the rest to a task), and the answer is the same as Tornado's, for
    a token accepted and one refused, in order with a frame the client sent meanwhile."""
    release = asyncio.Event()

    async def authenticator(token):
        await release.wait()
        return 7 if token == "good" else None

    pair = fronts(authenticator=authenticator)
    for token, success in (("good", True), ("bad", False)):
        readers = []
        for front in pair:
            sock = await open_socket(front.port)
            await asyncio.get_running_loop().sock_sendall(sock, upgrade(front.port, token=token))
            readers.append(Reader(sock))
        answers = []
        for reader in readers:
            head = await reader.head()
            assert head is not None and head.startswith(b"HTTP/1.1 101 ")
        release.set()
        for reader in readers:
            opcode, payload = await reader.frame()
            message = ujson.loads(payload)
            message.pop("web_socket_id", None)
            answers.append((opcode, message))
            reader.sock.close()
        release.clear()
        assert answers[0] == answers[1] and answers[0][1]["success"] is success
    assert counts(pair[0]) == (2, 0)


@pytest.mark.gen_test
async def test_a_connection_closed_while_open_waits_is_let_go(fronts):
    """The client leaves while the authenticator is thinking: the laned handler's task (the rest
    of its first step) ends as Tornado's does, counted the same, and the server serves the next
    connection."""
    release = asyncio.Event()
    calls: List[str] = []

    async def authenticator(token):
        calls.append(token)
        await release.wait()
        return 7

    pair = fronts(authenticator=authenticator)
    outcome = []
    for front in pair:
        calls.clear()
        sock = await open_socket(front.port)
        await asyncio.get_running_loop().sock_sendall(sock, upgrade(front.port, token="t1"))
        assert (await Reader(sock).head()).startswith(b"HTTP/1.1 101 ")
        sock.close()
        while not calls:  # barrier-ok: the authenticator has the token
            await asyncio.sleep(0.01)  # barrier-ok
        release.set()
        answer, reader = await exchange(front.port, upgrade(front.port, token="t2"))
        reader.sock.close()
        release.clear()
        outcome.append((answer, front.rt.counters.connections_opened))
    assert outcome[0] == outcome[1]
    assert outcome[0][0]["message"] == (1, {"type": "authentication", "success": True})
    assert counts(pair[0]) == (2, 0)


# --- the push-back, without a server ----------------------------------------------------------------

@pytest.mark.gen_test
async def test_unread_puts_bytes_back_in_front_of_the_read_buffer():
    left, right = socket.socketpair()
    stream = IOStream(left)
    try:
        assert transport.lane_problems(stream) == []
        right.sendall(b"GET / HTTP/1.1\r\n\r\nrest")
        head = await stream.read_until_regex(b"\r?\n\r?\n", max_bytes=1024)
        assert head == b"GET / HTTP/1.1\r\n\r\n"
        transport.unread(stream, head)
        assert await stream.read_until_regex(b"\r?\n\r?\n", max_bytes=1024) == head
        right.sendall(b"!")
        assert await stream.read_bytes(5) == b"rest!"
    finally:
        stream.close()
        right.close()


@pytest.mark.parametrize("block, fast_path", [
    ("Host: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", True),
    ("hOsT:a\r\nX-Y:  spaced  value \t\r\nEmpty:\r\nEmpty-Spaces:   \r\nTab:\tx\ty\t\r\n\r\n", True),
    ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nUser-Agent: a/1 (b; c) d=e,f\r\n\r\n", True),
    ("Dup: 1\r\ndup: 2\r\n\r\n", False),  # a repeated name
    ("Host: a\nX: b\r\n\r\n", False),  # a bare LF
    ("Host: caf\xe9\r\n\r\n", False),  # obs-text
    (" Folded: x\r\n\r\n", False),  # folding (Tornado refuses it)
    ("Bad Name: x\r\n\r\n", False), ("NoColon\r\n\r\n", False), ("Ctl: a\x01b\r\n\r\n", False),
])
def test_the_lanes_header_parser_agrees_with_tornados(block, fast_path):
    """Where the lane's parser answers, Tornado's gives the same headers; the rest is Tornado's."""
    from tornado.httputil import HTTPHeaders

    from tornado_rt.listener import fast_headers

    fast = fast_headers(block)
    if not fast_path:
        assert fast is None
        return
    assert fast is not None
    assert fast[1] == dict(fast[0].get_all())
    assert sorted(fast[0].get_all()) == sorted(HTTPHeaders.parse("\n" + block).get_all())


def test_the_internals_the_lane_relies_on_are_there_and_serve_gets_a_lane():
    """When Tornado changes, this fails loudly (the lane and the Date cache then fall back)."""
    from tornado_rt.listener import _Lane

    assert transport.lane_problems() == []
    assert transport.clear_problems() == [] and transport.CLEAR
    assert transport.request_problems() == [] and transport.headers_problems() == [] and transport.HEADERS
    rt = RealtimeServer(Settings(jwt_secret=SECRET, ping_interval=0), load_entry_points=False)
    lane = _Lane.find(make_app(rt, [API_KEY]))  # the application `tornado-rt serve` runs
    assert lane is not None and lane.paths == {"/ws/core", "/ws/core/"} and lane.server is rt
    mounted = RealtimeServer(Settings(jwt_secret=SECRET, path_prefix="/rt/socket/"), load_entry_points=False)
    from tornado.web import Application

    assert _Lane.find(Application(mounted.routes("/app"))).paths == {"/app/rt/socket", "/app/rt/socket/"}
    # A route before it that matches the same path: no lane (Tornado's routing decides).
    from tornado.web import RequestHandler

    assert _Lane.find(Application([(r"/ws/.*", RequestHandler)] + rt.routes())) is None
    assert _Lane.find(Application([(r"/other", RequestHandler)] + rt.routes())) is not None


@pytest.mark.parametrize("uri", [
    "/ws/core/", "/ws/core/?", "/ws/core/?jwt_token=a.b.c", "/ws/core/?a=1&a=2&b=&c&d=%41+%20",
    "/ws/core/?%FF=%FE&x==y",
])
def test_lane_request_builds_what_httpserverrequest_builds(uri):
    """Without a server: the lane's request (transport.lane_request) holds what Tornado's
    constructor makes of the same start line and headers, attribute for attribute."""
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

    headers = HTTPHeaders({"Host": "example.com:8000", "Upgrade": "websocket"})
    start_line = RequestStartLine("GET", uri, "HTTP/1.1")
    made = transport.lane_request(None, start_line, headers)
    tornados = HTTPServerRequest(start_line=start_line, headers=headers)
    mine, theirs = vars(made), vars(tornados)
    assert mine.pop("_start_time") <= theirs.pop("_start_time")
    assert mine == theirs and type(made) is HTTPServerRequest
    assert made.query_arguments is not made.arguments
    assert all(made.query_arguments[k] is not made.arguments[k] for k in made.arguments)
    assert transport.REQUEST  # the repeated constructor, not the fallback, was compared
    # Tornado's refusals are raised as Tornado raises them (the lane then hands the head back)
    from tornado.httputil import HTTPInputError

    for bad in ({"Host": "bad host"}, {"Host": "a,b"}, {"Upgrade": "websocket"}):
        with pytest.raises(HTTPInputError) as theirs:
            HTTPServerRequest(start_line=start_line, headers=HTTPHeaders(bad))
        with pytest.raises(HTTPInputError) as mine:
            transport.lane_request(None, start_line, HTTPHeaders(bad))
        assert str(mine.value) == str(theirs.value)


def test_lane_request_refuses_too_many_query_fields_as_tornado():
    from tornado.httputil import HTTPHeaders, HTTPInputError, HTTPServerRequest, RequestStartLine

    many = "/ws/core/?" + "&".join(f"f{i}=1" for i in range(transport._PARSE_BODY_CONFIG.urlencoded.max_arguments + 1))
    start_line = RequestStartLine("GET", many, "HTTP/1.1")
    with pytest.raises(HTTPInputError) as theirs:
        HTTPServerRequest(start_line=start_line, headers=HTTPHeaders({"Host": "a"}))
    with pytest.raises(HTTPInputError) as mine:
        transport.lane_request(None, start_line, HTTPHeaders({"Host": "a"}))
    assert str(mine.value) == str(theirs.value)


def test_make_headers_is_what_setting_each_field_makes():
    from tornado.httputil import HTTPHeaders

    fields = {"Host": "a", "Sec-Websocket-Key": "k==", "Empty": ""}
    one_by_one = HTTPHeaders()
    for name, value in fields.items():
        one_by_one[name] = value
    made = transport.make_headers(fields)
    assert vars(made) == vars(one_by_one) and type(made) is HTTPHeaders
    made.add("Host", "b")  # its own lists: the fields given are not shared
    assert made.get_list("Host") == ["a", "b"] and fields["Host"] == "a"
    assert one_by_one.get_list("Host") == ["a"]


class _Steps:
    """A stand-in for a handler's ``_execute``: records what happens to it, awaits ``wait``."""

    def __init__(self, wait=None):
        self.wait = wait
        self.log: List[Any] = []

    async def _execute(self, transforms):
        self.log.append(("started", transforms))
        if self.wait is not None:
            try:
                self.log.append(("got", await self.wait))
            except asyncio.CancelledError:
                self.log.append("cancelled")
                raise
            except ValueError as exc:
                self.log.append(("raised", str(exc)))
        return "result"


@pytest.mark.gen_test
async def test_execute_runs_the_first_step_now_and_the_rest_in_a_task():
    """transport.execute: a handler done in its first step needs no task (None, already run);
    one that waits continues in a task that sends it the awaited result, throws the awaited
    error into it, or cancels it where it waits, as a task running it from the start would."""
    loop = asyncio.get_running_loop()
    done = _Steps()
    assert transport.execute(done, ["t"], loop) is None and done.log == [("started", ["t"])]

    for outcome in ("value", "error", "cancel"):
        future = loop.create_future()
        steps = _Steps(future)
        task = transport.execute(steps, [], loop)
        assert task is not None and steps.log == [("started", [])]  # the first step ran already
        await asyncio.sleep(0)
        assert not task.done()
        if outcome == "value":
            future.set_result(42)
            assert await task == "result" and steps.log[1:] == [("got", 42)]
        elif outcome == "error":
            future.set_exception(ValueError("no"))
            assert await task == "result" and steps.log[1:] == [("raised", "no")]
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert steps.log[1:] == ["cancelled"] and future.cancelled()


def test_a_different_tornado_is_noticed_and_the_public_way_used(monkeypatch):
    """request_problems / headers_problems notice a constructor or HTTPHeaders other than the
    ones repeated; lane_request and make_headers then use Tornado's own, with the same result."""
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

    class OtherRequest(HTTPServerRequest):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = True

    class OtherHeaders(HTTPHeaders):
        def __setitem__(self, name, value):
            super().__setitem__(name, value.strip())

    assert transport.request_problems(OtherRequest) == ["HTTPServerRequest.__init__ differs"]
    assert transport.headers_problems(OtherHeaders) == ["HTTPHeaders.__setitem__ differs"]
    start_line = RequestStartLine("GET", "/ws/core/?a=1&a=2", "HTTP/1.1")
    headers = HTTPHeaders({"Host": "h"})
    fast = vars(transport.lane_request(None, start_line, headers))
    monkeypatch.setattr(transport, "REQUEST", False)
    monkeypatch.setattr(transport, "HEADERS", False)
    public = vars(transport.lane_request(None, start_line, headers))
    assert fast.pop("_start_time") <= public.pop("_start_time") and fast == public
    assert vars(transport.make_headers({"Host": "h", "X": "y"})) == {
        "_as_list": {"Host": ["h"], "X": ["y"]}, "_combined_cache": {"Host": "h", "X": "y"}}
