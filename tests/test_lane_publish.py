"""The publish lane of the guarded listener: ``POST /api/publish`` (the common head: HTTP/1.1,
strict headers, one Content-Length within the publish fast path's limit, no Transfer-Encoding,
no Expect, keep-alive) is read by the listener and driven through the application's own
delegate for the route, on keep-alive connections; any other head is put back and the rest of
the connection is Tornado's.

Every case runs against two real servers, one with the lane and one without, over real sockets;
the answers (status, headers except the Date value, body) and what follows on the same
connection must be the same, and ``lane_publishes`` says which requests the lane took.
"""
import asyncio
import logging
import re
import socket
from typing import Any, Dict, List, Optional

import pytest
import ujson

from conftest import make_token
from test_lane import API_KEY, Reader, fronts, open_socket, response, upgrade  # noqa: F401 (fixture)

MESSAGE = {"message": {"type": "notifications_created", "notifications": []}, "to": {"user_ids": [1]}}


def post(body: Any = MESSAGE, key: Optional[str] = API_KEY, content_type: str = "application/json",
         extra: str = "", length: Optional[int] = None, path: str = "/api/publish") -> bytes:
    data = body if isinstance(body, bytes) else ujson.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", "Host: lane.test"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines.append(f"Content-Type: {content_type}")
    if length is not False:
        lines.append(f"Content-Length: {len(data) if length is None else length}")
    head = ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")
    return head + data


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: lane.test\r\n\r\n"


async def session(port: int, steps: List[bytes], answers_per_step: Optional[List[int]] = None) -> List[Any]:
    """Send each step on ONE connection (one write each) and read the answers after it (one per
    step unless told); None once the server closed. Ends with whether the connection is closed
    after the last answer... read only when the last answer was None."""
    sock = await open_socket(port)
    loop = asyncio.get_running_loop()
    reader = Reader(sock)
    out: List[Any] = []
    try:
        for i, step in enumerate(steps):
            try:
                await loop.sock_sendall(sock, step)
            except (BrokenPipeError, ConnectionResetError):
                out.append("send failed")
                break
            for _ in range(answers_per_step[i] if answers_per_step else 1):
                answer = await response(reader)
                out.append(answer)
                if answer is None:
                    return out
    finally:
        sock.close()
    return out


async def both(pair, steps: List[bytes], answers_per_step: Optional[List[int]] = None) -> List[Any]:
    results = [await session(front.port, steps, answers_per_step) for front in pair]
    assert results[0] == results[1]
    return results[0]


def laned(front) -> int:
    return front.stats.lane_publishes


def body_of(answer: Dict[str, Any]) -> Any:
    return ujson.loads(answer["body"])


# --- the tests --------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_a_publish_is_laned_answered_as_tornado_answers_it_and_delivered(fronts):
    pair = fronts()
    frames = []
    for front in pair:  # a subscriber (user 1) on each server
        sock = await open_socket(front.port)
        await asyncio.get_running_loop().sock_sendall(sock, upgrade(front.port, token=make_token(1)))
        reader = Reader(sock)
        assert (await response(reader))["status"] == 101
        [answer] = await session(front.port, [post()])
        assert answer["status"] == 200 and body_of(answer) == {"published": 1, "delivered": 1}
        assert answer["headers"]["content-type"] == "application/json; charset=UTF-8"
        assert answer["headers"]["cache-control"] == "no-store" and "connection" not in answer["headers"]
        opcode, payload = await reader.frame()
        frames.append((opcode, ujson.loads(payload), answer))
        sock.close()
    assert frames[0] == frames[1] and frames[0][1] == MESSAGE["message"]
    assert laned(pair[0]) == 1 and laned(pair[1]) == 0
    assert pair[0].http.unauthenticated_count() == 0  # released after the key check


@pytest.mark.parametrize("case, status, field", [
    ("wrong key", 401, None), ("no key", 401, None), ("text/plain", 415, None),
    ("over the limit", 413, None), ("invalid JSON", 400, None), ("no message", 400, "message"),
    ("empty body", 400, None), ("not UTF-8", 400, None)])
@pytest.mark.gen_test
async def test_refusals_are_the_same_and_the_connection_goes_on_as_with_tornado(fronts, case, status, field):
    pair = fronts()
    request = {
        "wrong key": post(key="wrong"), "no key": post(key=None),
        "text/plain": post(content_type="text/plain"),
        "over the limit": post(b"", length=10 * 1024 * 1024 + 1),  # the body is never sent
        "invalid JSON": post(b"{"), "no message": post({"to": {"all_users": True}}),
        "empty body": post(b""), "not UTF-8": post(b"\xff\xfe{}"),
    }[case]
    # After the refusal, a valid publish on the same connection: answered, or the connection
    # closed, as Tornado does it.
    answers = await both(pair, [request, post()])
    assert answers[0]["status"] == status
    if field is not None:
        assert body_of(answers[0])["field"] == field
    assert len(answers) == 2
    if answers[1] is not None:
        assert answers[1]["status"] == 200
    # the lane drove the requests whose head it takes (a body over the fast path's limit: not)
    expected = 0 if case == "over the limit" else (1 if answers[1] is None else 2)
    assert laned(pair[0]) == expected and laned(pair[1]) == 0


@pytest.mark.parametrize("case", ["chunked", "expect", "http/1.0", "connection close", "lf only",
                                  "repeated header", "another path"])
@pytest.mark.gen_test
async def test_heads_the_lane_does_not_take_are_tornados_for_the_rest_of_the_connection(fronts, case):
    pair = fronts()
    body = ujson.dumps(MESSAGE).encode()
    chunked = (b"POST /api/publish HTTP/1.1\r\nHost: lane.test\r\nAuthorization: Bearer " + API_KEY.encode()
               + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    steps, per_step = {
        "chunked": ([chunked, post()], None),
        "expect": ([post(extra="Expect: 100-continue\r\n")[:-len(body)], body, post()], [1, 1, 1]),
        "http/1.0": ([post().replace(b"HTTP/1.1", b"HTTP/1.0", 1), post()], None),
        "connection close": ([post(extra="Connection: close\r\n"), post()], None),
        "lf only": ([post().replace(b"\r\n", b"\n"), post()], None),
        "repeated header": ([post(extra="Accept: a\r\nAccept: b\r\n"), post()], None),
        "another path": ([post(path="/api/publish/"), post()], None),
    }[case]
    answers = await both(pair, steps, per_step)
    statuses = [a and a["status"] for a in answers]
    assert statuses == {
        "chunked": [200, 200], "expect": [100, 200, 200], "http/1.0": [200, None],
        "connection close": [200, None], "lf only": [200, 200], "repeated header": [200, 200],
        "another path": [404, None]}[case]  # answered before its body: closed
    assert laned(pair[0]) == 0 and pair[0].stats.lane_fallbacks == 1


@pytest.mark.gen_test
async def test_many_publishes_on_one_keep_alive_connection_are_all_laned(fronts):
    pair = fronts()
    n = 40
    answers = await both(pair, [post()] * n)
    assert [a["status"] for a in answers] == [200] * n
    assert laned(pair[0]) == n and laned(pair[1]) == 0
    assert pair[0].stats.lane_fallbacks == 0


@pytest.mark.gen_test
async def test_a_pipelined_pair_in_one_write(fronts):
    pair = fronts()
    second = {"message": {"type": "notifications_created", "notifications": [1]}, "to": {"user_ids": [2]}}
    answers = await both(pair, [post() + post(second), post()], [2, 1])
    assert [a["status"] for a in answers] == [200, 200, 200]
    assert laned(pair[0]) == 3


@pytest.mark.gen_test
async def test_a_body_sent_one_byte_per_write(fronts):
    pair = fronts()
    request = post()
    head, _, body = request.partition(b"\r\n\r\n")
    results = []
    for front in pair:
        sock = await open_socket(front.port)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, head + b"\r\n\r\n")
        if front is pair[0]:  # the lane has read the head (and is waiting for the body)
            for _ in range(2000):  # barrier-ok: bounded wait for the head to be read
                if laned(front) == 1:
                    break
                await asyncio.sleep(0.002)  # barrier-ok
            assert laned(front) == 1
        for i in range(len(body)):
            await loop.sock_sendall(sock, body[i:i + 1])
        reader = Reader(sock)
        first = await response(reader)
        await loop.sock_sendall(sock, post())  # and the connection goes on
        results.append((first, await response(reader)))
        sock.close()
    assert results[0] == results[1] and results[0][0]["status"] == 200 and results[0][1]["status"] == 200
    assert laned(pair[0]) == 2


@pytest.mark.gen_test
async def test_a_laned_request_then_a_tornado_one_then_publishes_again(fronts):
    pair = fronts()
    answers = await both(pair, [post(), HEALTHZ, post(), post()])
    assert [a["status"] for a in answers] == [200, 200, 200, 200]
    assert body_of(answers[1])["status"] == "ok"
    # the lane drove the first; /healthz and the rest of the connection are Tornado's
    assert laned(pair[0]) == 1 and pair[0].stats.lane_fallbacks == 1


@pytest.mark.gen_test
async def test_a_client_closing_mid_body(fronts):
    pair = fronts(listener={"settings": {"max_unauthenticated_per_address": 1}})
    request = post()
    for front in pair:
        sock = await open_socket(front.port)
        await asyncio.get_running_loop().sock_sendall(sock, request[:-5])
        if front is pair[0]:
            for _ in range(2000):  # barrier-ok: bounded wait for the head to be read
                if laned(front) == 1:
                    break
                await asyncio.sleep(0.002)  # barrier-ok
        sock.close()
        # the connection is gone (its slot released): a new one is served
        for _ in range(2000):  # barrier-ok: bounded wait for the server to see the close
            if front.http.unauthenticated_count() == 0:
                break
            await asyncio.sleep(0.002)  # barrier-ok
        assert front.http.unauthenticated_count() == 0
        [answer] = await session(front.port, [post()])
        assert answer["status"] == 200
    assert laned(pair[0]) == 2


@pytest.mark.gen_test
async def test_an_idle_laned_keep_alive_connection_is_closed_after_idle_timeout(fronts):
    pair = fronts(listener={"settings": {"idle_timeout": 0.2}})
    for front in pair:
        sock = await open_socket(front.port)
        await asyncio.get_running_loop().sock_sendall(sock, post())
        reader = Reader(sock)
        assert (await response(reader))["status"] == 200
        assert await reader.eof()  # closed by the server, nothing sent
        sock.close()
    assert laned(pair[0]) == 1


@pytest.mark.gen_test
async def test_shutdown_closes_laned_keep_alive_connections(fronts):
    pair = fronts()
    for front in pair:
        sock = await open_socket(front.port)
        await asyncio.get_running_loop().sock_sendall(sock, post())
        reader = Reader(sock)
        assert (await response(reader))["status"] == 200
        await front.http.close_all_connections()
        assert await reader.eof()
        sock.close()
    assert laned(pair[0]) == 1


@pytest.mark.gen_test
async def test_access_lines_are_the_same(fronts, caplog):
    pair = fronts()
    lines = []
    for front in pair:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tornado.access"):
            await session(front.port, [post(path="/api/publish?jwt_token=secret&x=1"), post(b"{"), post()])
        lines.append([re.sub(r"\d+\.\d+ms", "?ms", r.getMessage()) for r in caplog.records
                      if r.name == "tornado.access"])
    assert lines[0] == lines[1] and len(lines[0]) == 3
    assert "secret" not in " ".join(lines[0])
    assert lines[0][0].startswith("200 POST /api/publish?") and lines[0][1].startswith("400 POST /api/publish")
    assert laned(pair[0]) == 3


@pytest.mark.gen_test
async def test_the_address_cap_is_released_by_the_key_and_kept_on_401(fronts):
    pair = fronts(listener={"settings": {"max_unauthenticated_per_address": 1}})
    for front in pair:
        first = await open_socket(front.port)
        reader = Reader(first)
        loop = asyncio.get_running_loop()
        # A publish without a body yet: the head is read, the key checked: 401 (then closed)
        # keeps the slot until then; a valid key releases it at once.
        await loop.sock_sendall(first, post(key="wrong"))
        answer = await response(reader)
        assert answer["status"] == 401
        assert await reader.eof()
        first.close()
        for _ in range(2000):  # barrier-ok: bounded wait for the close to be seen
            if front.http.unauthenticated_count() == 0:
                break
            await asyncio.sleep(0.002)  # barrier-ok
        held = await open_socket(front.port)  # the one unauthenticated slot
        await loop.sock_sendall(held, post())
        held_reader = Reader(held)
        assert (await response(held_reader))["status"] == 200
        assert front.http.unauthenticated_count() == 0  # released by the key check, still open
        [answer] = await session(front.port, [post()])  # another connection fits
        assert answer["status"] == 200
        # An unauthenticated keep-alive connection keeps the slot: a further one is refused.
        unauth = await open_socket(front.port)
        await loop.sock_sendall(unauth, HEALTHZ)
        unauth_reader = Reader(unauth)
        assert (await response(unauth_reader))["status"] == 200
        refused = await session(front.port, [post()])
        assert refused == [None]
        held.close()
        unauth.close()
    assert laned(pair[0]) == 3


@pytest.mark.gen_test
async def test_a_body_not_sent_within_body_timeout_closes_the_connection(fronts, caplog):
    pair = fronts(listener={"settings": {"body_timeout": 0.2}})
    request = post()
    for front in pair:
        sock = await open_socket(front.port)
        with caplog.at_level(logging.INFO, logger="tornado.general"):
            await asyncio.get_running_loop().sock_sendall(sock, request[:-5])
            reader = Reader(sock)
            assert await reader.eof()  # closed, no answer
        sock.close()
    timeouts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Timeout reading body")]
    assert len(timeouts) == 2  # one line per server
    assert laned(pair[0]) == 1
