"""Bytes on demand (issue 16, items 5b and 5c): a server publishes a plain page message without
its envelope bytes when the last publish to its group needed none (only this process or nobody
registered for the group, no history); the publish script says per envelope whether Redis needed
the bytes, and stops, applying nothing, at an envelope that came without bytes it needs, which
the publisher then sends again with them (the rest of the call after it too), before anything
else. Against a real ``redis-server`` and real ``tornado-rt serve`` subprocesses:

* A page watched only on the publisher: after the first publish, Redis receives none of the
  envelope bytes (``INFO stats`` ``total_net_input_bytes`` grows by less than one envelope for
  five of them; the first one, sent with its bytes, grew it by more than its size) and the
  client gets every message.
* The hint goes stale when another process subscribes: the next publish is sent again with its
  bytes and reaches both processes' clients, a message after it comes after it on both.
* ... when a history starts after the hint was learnt: offsets consecutive, recovery returns the
  message.
* ... when the control stream starts over (Redis restarted without data): nothing lost, no gap.
* A snapshot another process wrote past the new stream's first entries (while this one was
  stalled) does not make it skip the page messages among them; the directory changes among
  them that the snapshot holds are not applied twice.
* A resend in the middle of a batch: what came before is applied once (Redis holds one
  reference / one copy each), the rest exactly once, in order.
* Without sockets: the reading of the script's reply codes.

Non-delivery is proved with a marker that must be the next message received.
"""
import asyncio
import signal
import time

import pytest
import redis as redis_sync

from redis_fixtures import WSClient, require_redis_package, token  # noqa: F401
from test_redis_routing import DIRECTORY, PREFIX, stats
from test_redis_streams import cluster, connect, marker_to_all, metrics, rows_created  # noqa: F401
from tornado.websocket import websocket_connect
from tornado_rt.redis_broker import parse_refs

BIG = "x" * 20_000  # a message text far larger than everything else a process sends Redis meanwhile


def _id(message):
    return message["rows"][0]["id"]


def _input_bytes(raw) -> int:
    return int(raw.info("stats")["total_net_input_bytes"])


async def _recv_ids(client, count):
    out = []
    for _ in range(count):
        got = await client.recv()
        assert got["type"] == "rows_created", (client.node.name, str(got)[:300])
        out.append(_id(got))
    return out


async def _publish_once_back(node, envelope, timeout=30.0):
    """After a Redis restart: publish ``envelope`` through ``node`` until its publisher is back
    (200); a 503 was applied nowhere, so retrying it sends it once. Bounded."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"{node.name} did not accept publishes after the restart"
        status, _ = await node.call("POST", "/api/publish", envelope)
        if status == 200:
            return
        assert status == 503, status
        await asyncio.sleep(0.05)  # barrier-ok: bounded poll for the reconnect


# --- pure logic -------------------------------------------------------------------------------------

def test_reply_codes_are_read_with_the_resend_point_and_checked():
    from tornado_rt.redis_broker import (REPLY_ELSEWHERE, REPLY_NOT_TRIED, REPLY_NOWHERE_LEAN, REPLY_OWN,
                                         REPLY_OWN_LEAN, REPLY_REFUSED, REPLY_RESEND, read_codes)

    # The reply's tail: [n0, one character per envelope]; the k-th "+" is n0 + k (hiredis gives
    # the script's strings as bytes; a client decoding replies gives str).
    assert read_codes([b"0", b""]) == ([], None)
    assert read_codes([6, b"+1234+0"]) == ([7, REPLY_OWN, REPLY_ELSEWHERE, REPLY_OWN_LEAN, REPLY_NOWHERE_LEAN,
                                            8, REPLY_REFUSED], None)
    assert read_codes([b"11", "+3"]) == ([12, -3], None)
    big = 1_733_000_000_000_000  # a new stream's n: Redis time in ms x 1000
    assert read_codes([b"%d" % big, b"++"]) == ([big + 1, big + 2], None)
    assert read_codes([0, b"3" * 100]) == ([REPLY_OWN_LEAN] * 100, None)
    # Stopped at the third: it and everything after it must be sent again.
    codes, resend = read_codes([8, b"3+566"])
    assert resend == 2 and codes == [-3, 9, -5, -6, -6]
    assert read_codes([0, b"5"]) == ([-5], 0)
    # What the script never returns is refused, not guessed at.
    for bad in ([0, b"51"], [0, b"6"], [0, b"16"], [0, b"55"], [0, b"7"], [0, b"3-3"], [0, b"65"],
                [0, b"5+"], [b"x", b"3"], [0], [0, b"3", b"3"], [0, 3], None):
        with pytest.raises(ValueError):
            read_codes(bad)


# --- against Redis ------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_a_page_watched_only_on_the_publisher_sends_redis_no_bytes_after_its_first_publish(connect):  # noqa: F811
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_a, on_b = await connect(a, 1), await connect(b, 2)
        await on_a.subscribe("table", table_id=10)
        raw = redis_sync.Redis.from_url(redis.url)
        try:
            before = _input_bytes(raw)
            await a.publish({"message": rows_created(10, 0, BIG)})  # no hint yet: with its bytes
            assert await _recv_ids(on_a, 1) == [0]
            first = _input_bytes(raw) - before
            seen = await stats(a)
            assert seen["sent_without_bytes"] == 0 and seen["resends"] == 0, seen
            with_bytes = seen["sent_with_bytes"]

            before = _input_bytes(raw)
            for i in range(1, 6):
                await a.publish({"message": rows_created(10, i, BIG)})
            assert await _recv_ids(on_a, 5) == [1, 2, 3, 4, 5]
            later = _input_bytes(raw) - before
        finally:
            raw.close()
        # Redis's own count of what it received: the first publish carried its 20 KB, the five
        # after it together less than one of them.
        assert first > len(BIG), first
        assert later < len(BIG), later
        seen = await stats(a)
        assert seen["sent_without_bytes"] == 5 and seen["resends"] == 0, seen
        assert seen["sent_with_bytes"] == with_bytes, seen
        assert seen["inbox_envelopes"] == 6, seen  # read back as references, in order
        await marker_to_all(a, on_a, on_b)  # nothing else reached A's client nor B's
        assert (await stats(b))["inbox_envelopes"] == 0


@pytest.mark.gen_test(timeout=60)
async def test_a_stale_hint_is_resent_with_bytes_when_another_process_subscribes(connect):  # noqa: F811
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_a, on_b = await connect(a, 1), await connect(b, 2)
        await on_a.subscribe("table", table_id=10)
        await a.publish({"message": rows_created(10, 1)})
        await a.publish({"message": rows_created(10, 2)})
        assert await _recv_ids(on_a, 2) == [1, 2]
        assert (await stats(a))["sent_without_bytes"] == 1  # the hint was learnt from the first

        await on_b.subscribe("table", table_id=10)  # B registered the page: the hint is stale
        # 3 and 4 go without their bytes, Redis stops at 3; both are sent again with their bytes.
        await a.publish([{"message": rows_created(10, 3)}, {"message": rows_created(10, 4)}])
        await a.publish({"message": rows_created(10, 5)})  # the marker after it: with bytes
        assert await _recv_ids(on_a, 3) == [3, 4, 5]
        assert await _recv_ids(on_b, 3) == [3, 4, 5]  # B's first message is 3: nothing before it
        await marker_to_all(a, on_a, on_b)
        seen = await stats(a)
        assert seen["resends"] == 1 and seen["sent_without_bytes"] == 3, seen
        assert (await stats(b))["inbox_envelopes"] == 3
        exposed = await metrics(a)
        assert exposed["tornado_rt_redis_resends_total"] == 1
        for node in (a, b):
            assert (await metrics(node))["tornado_rt_duplicates_dropped_total"] == 0


@pytest.mark.gen_test(timeout=60)
async def test_a_stale_hint_when_a_history_starts_keeps_offsets_and_recovery(connect):  # noqa: F811
    with cluster(connect, 2, serve_args=["--history-size", "10"]) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        plain = await connect(a, 1)  # no positions: the page keeps no history yet
        await plain.subscribe("table", table_id=10)
        await a.publish({"message": rows_created(10, 1)})
        await a.publish({"message": rows_created(10, 2)})
        assert await _recv_ids(plain, 2) == [1, 2]
        assert (await stats(a))["sent_without_bytes"] == 1

        # A client with positions on A itself: only A is registered, but the history needs the bytes.
        watcher = WSClient(await websocket_connect(f"{a.ws_url}?jwt_token={token(3)}&positions=1"), a)
        connect.clients.append(watcher)
        assert (await watcher.recv())["success"] is True
        added = await watcher.subscribe("table", table_id=10)
        epoch, start = added["position"]["epoch"], added["position"]["offset"]
        await a.publish([{"message": rows_created(10, 3)}, {"message": rows_created(10, 4)}])
        for n, offset in ((3, start + 1), (4, start + 2)):
            got = await watcher.recv()
            assert _id(got) == n and got["position"] == {"epoch": epoch, "offset": offset}, got
        assert await _recv_ids(plain, 2) == [3, 4]
        seen = await stats(a)
        assert seen["resends"] == 1 and seen["sent_without_bytes"] == 3, seen  # 2, then 3 and 4

        # Recovery on the other process returns both from the history.
        again = WSClient(await websocket_connect(f"{b.ws_url}?jwt_token={token(2)}&positions=1"), b)
        connect.clients.append(again)
        assert (await again.recv())["success"] is True
        await again.send({"page": "table", "table_id": 10, "since": {"epoch": epoch, "offset": start}})
        reply = await again.recv()
        assert reply["type"] == "page_add" and reply["recovered"] is True, reply
        for n, offset in ((3, start + 1), (4, start + 2)):
            got = await again.recv()
            assert _id(got) == n and got["position"] == {"epoch": epoch, "offset": offset}, got
        await marker_to_all(b, plain, watcher, again)


@pytest.mark.gen_test(timeout=90)
async def test_a_stale_hint_when_the_control_stream_starts_over_loses_nothing(connect):  # noqa: F811
    """Redis restarted without data: the first envelope goes on the (new) control stream, so a
    publish sent without its bytes on the strength of the old hint is sent again with them."""
    require_redis_package()
    with cluster(connect, 2, serve_args=["--presence-ttl", "1.5"]) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_a, on_b = await connect(a, 1), await connect(b, 2)
        await on_a.subscribe("table", table_id=10)
        await a.publish({"message": rows_created(10, 0)})
        await a.publish({"message": rows_created(10, 1)})
        assert await _recv_ids(on_a, 2) == [0, 1]
        assert (await stats(a))["sent_without_bytes"] == 1  # the hint holds

        redis.restart()  # SIGKILL, then a fresh redis-server without data on the same port
        sent = 2
        await _publish_once_back(a, {"message": rows_created(10, sent)})
        assert await _recv_ids(on_a, 1) == [sent]
        seen = await stats(a)
        assert seen["resends"] == 1, seen  # sent without its bytes on the old hint, then with them
        sent += 1
        await a.publish([{"message": rows_created(10, sent + i)} for i in range(10)])
        assert await _recv_ids(on_a, 10) == list(range(sent, sent + 10))
        await marker_to_all(b, on_a, on_b)  # nothing else, nothing twice
        exposed = await metrics(a)
        assert exposed["tornado_rt_redis_gaps_total"] == 0
        assert exposed["tornado_rt_redis_envelopes_lost_total"] == 0
        assert (await stats(a))["resends"] == 1  # no hint is learnt from the control stream


@pytest.mark.gen_test(timeout=60)
async def test_a_snapshot_written_past_the_first_entries_of_a_new_stream_loses_no_page_message(connect):  # noqa: F811
    """Redis restarted without data while A was stalled; B read the new control stream's first
    entries (a page message for A's client, then a directory change) and wrote its directory
    snapshot at the last one's position. A, reading them late, sees the stream started over and
    loads the snapshot: the page message is still delivered (the snapshot holds directory
    changes, not messages), the directory change is not applied twice."""
    require_redis_package()
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_a, on_b = await connect(a, 1), await connect(b, 2)
        await on_a.subscribe("table", table_id=10)
        await a.publish({"message": rows_created(10, 1)})
        assert await _recv_ids(on_a, 1) == [1]

        a.proc.send_signal(signal.SIGSTOP)
        try:
            redis.restart()  # SIGKILL, then a fresh redis-server without data on the same port
            deadline = time.monotonic() + 30
            await _publish_once_back(b, {"message": rows_created(10, 2)})
            # Then a directory change (table 12 joins workspace 1): the new stream's second entry.
            await b.put_directory({**DIRECTORY, "tables": {**DIRECTORY["tables"], "12": 1}})
            raw = redis_sync.Redis.from_url(redis.url)
            try:
                last = int(raw.xrevrange(f"{PREFIX}:stream", count=1)[0][0].split(b"-")[0])
                while True:  # until B has written its snapshot at (or past) that last entry
                    assert time.monotonic() < deadline, "B wrote no snapshot after the restart"
                    stored = raw.hget(f"{PREFIX}:directory", "p")
                    if stored is not None and int(stored) >= last:
                        break
                    await asyncio.sleep(0.05)  # barrier-ok: bounded poll for B's snapshot write
            finally:
                raw.close()
        finally:
            a.proc.send_signal(signal.SIGCONT)
        assert await _recv_ids(on_a, 1) == [2]
        await marker_to_all(b, on_a, on_b)  # nothing else, nothing twice
        exposed = await metrics(a)
        assert exposed["tornado_rt_redis_resets_total"] == 1
        assert exposed["tornado_rt_redis_envelopes_lost_total"] == 0
        # The directory change was in the snapshot A loaded: not applied a second time, and A
        # answers with the new directory.
        assert (await stats(a))["directory_in_snapshot"] == 1
        assert exposed["tornado_rt_redis_directory_in_snapshot_total"] == 1
        added = await on_a.subscribe("table", table_id=12)
        assert added["type"] == "page_add", added


@pytest.mark.gen_test(timeout=60)
async def test_a_resend_in_the_middle_of_a_batch_applies_each_envelope_once_in_order(connect):  # noqa: F811
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_a, on_b = await connect(a, 1), await connect(b, 2)
        await on_a.subscribe("table", table_id=10)
        await on_a.subscribe("table", table_id=11)
        await a.publish([{"message": rows_created(10, 1)}, {"message": rows_created(11, 2)}])
        assert await _recv_ids(on_a, 2) == [1, 2]
        await on_b.subscribe("table", table_id=11)  # the hint of table 11 is stale, table 10's is not
        before = await stats(a)

        # All six go without bytes (both hints are set); 3 and 4 (table 10) are applied, 5 (table
        # 11) stops the call; 5..8 are sent again with their bytes.
        pages = {3: 10, 4: 10, 5: 11, 6: 10, 7: 11, 8: 10}
        await a.publish([{"message": rows_created(table, i)} for i, table in pages.items()])
        assert await _recv_ids(on_a, 6) == [3, 4, 5, 6, 7, 8]
        assert await _recv_ids(on_b, 2) == [5, 7]
        await marker_to_all(a, on_a, on_b)
        after = await stats(a)
        assert after["resends"] - before["resends"] == 1, (before, after)
        assert after["sent_without_bytes"] - before["sent_without_bytes"] == 6, (before, after)
        # 5..8, and the marker (to all users: the control stream)
        assert after["sent_with_bytes"] - before["sent_with_bytes"] == 5, (before, after)

        # Redis itself holds each once: A's inbox one reference per publish of A, B's one copy of 5 and 7.
        raw = redis_sync.Redis.from_url(redis.url)
        raw.set_response_callback("XRANGE", lambda reply, **options: reply)  # fields as sent: "m" repeats
        try:
            refs, copies = [], []
            for key in raw.keys(f"{PREFIX}:inbox:*"):
                for _, fields in raw.xrange(key):
                    for name, value in zip(fields[::2], fields[1::2]):
                        if name == b"R":
                            refs += parse_refs(value)[0]
                        elif name == b"e" or name.startswith(b"m"):
                            copies.append(_id(_payload(value)))
        finally:
            raw.close()
        assert len(refs) == len(set(refs)) == 8, refs  # 1..8 through A's inbox, once each
        assert sorted(copies) == [5, 7], copies
        for node in (a, b):
            assert (await metrics(node))["tornado_rt_duplicates_dropped_total"] == 0


def _payload(value: bytes) -> dict:
    """The message of an inbox envelope field (a JSON header line, then the message text)."""
    import ujson

    return ujson.loads(value.split(b"\n", 1)[1])


@pytest.mark.gen_test(timeout=60)
async def test_a_stale_or_missing_mirror_of_the_control_streams_top_is_not_trusted(connect):  # noqa: F811
    """The publish script reads the control stream's last sequence number from <prefix>:top, set
    whenever it appends there; a mirror that is behind the stream (written by something else) or
    missing is not trusted: the script reads the stream's last entry and writes the mirror again.
    Every control message still arrives once, in order, without a gap."""
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_a, on_b = await connect(a, 1), await connect(b, 2)
        raw = redis_sync.Redis.from_url(redis.url)
        try:
            await marker_to_all(a, on_a, on_b)
            top = int(raw.xrevrange(f"{PREFIX}:stream", count=1)[0][0].split(b"-")[0])
            assert int(raw.get(f"{PREFIX}:top")) == top
            raw.set(f"{PREFIX}:top", top - 1)  # behind the stream
            await marker_to_all(b, on_a, on_b)
            assert int(raw.get(f"{PREFIX}:top")) == top + 1
            raw.delete(f"{PREFIX}:top")
            await marker_to_all(a, on_a, on_b)
            assert int(raw.get(f"{PREFIX}:top")) == top + 2
            assert [int(i.split(b"-")[0]) for i, _ in raw.xrevrange(f"{PREFIX}:stream", count=3)] == [
                top + 2, top + 1, top]
        finally:
            raw.close()
        for node in (a, b):
            exposed = await metrics(node)
            assert exposed["tornado_rt_redis_gaps_total"] == 0 and exposed["tornado_rt_redis_resets_total"] == 0
