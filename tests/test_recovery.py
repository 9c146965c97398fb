"""The recovery extension (issue 14, docs/protocol.md "Extensions"): positions on page messages
for connections opened with ``positions=1``, ``since`` on subscribe, bounded history; and the
proof that a connection that does not opt in gets byte-identical frames, sharing one bytes object.
Over real sockets (the ``server`` fixture, RawClient for raw bytes) and, for the store's logic,
without sockets."""
import asyncio
import json
import struct

import pytest
import ujson

from conftest import make_token
from raw_client import RawClient
from tornado_rt.envelope import message_envelope
from tornado_rt.history import MemoryHistory, positioned_text
from tornado_rt.session import Session

POSITIONS = "&positions=1"


def rows_created(n, table_id=10):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": n, "name": f"row \u00e9 {n}"}],
            "metadata": {}, "before_row_id": None}


def golden_frame(obj):
    """The frame main sent for ``obj``, computed here without tornado-rt's code: compact JSON,
    UTF-8 (not escaped), in an unmasked, unfragmented text frame (RFC 6455 §5.2)."""
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    n = len(payload)
    head = bytes((0x81, n)) if n < 126 else struct.pack("!BBH", 0x81, 126, n)
    return head + payload


async def raw_frame(client):
    """The next frame's raw bytes, header included."""
    assert await client._fill(2)
    n, offset = client.buf[1] & 0x7F, 2
    if n == 126:
        assert await client._fill(4)
        n, offset = struct.unpack("!H", client.buf[2:4])[0], 4
    assert await client._fill(offset + n)
    frame, client.buf = client.buf[:offset + n], client.buf[offset + n:]
    return frame


async def positioned(connect, user_id=1):
    return await connect(query=f"?jwt_token={make_token(user_id)}{POSITIONS}")


async def subscribe_since(client, since, table_id=10):
    await client.send({"page": "table", "table_id": table_id, "since": since})
    reply = await client.recv()
    assert reply["type"] == "page_add", reply
    return reply


# --- a connection that does not opt in ------------------------------------------------------------

@pytest.mark.gen_test
async def test_non_opted_connection_gets_byte_identical_frames(server, http_port, connect, barrier):
    """With history on (the default) and a positioned subscriber on the same page, a plain
    connection's bytes are exactly main's: authentication aside, page_add and each message."""
    opted = await positioned(connect)
    await opted.subscribe("table", table_id=10)
    raw = await RawClient.connect(http_port, f"?jwt_token={make_token(2)}")
    try:
        auth = await raw.recv()
        assert auth["success"] is True
        await raw.send({"page": "table", "table_id": 10, "since": {"epoch": "x", "offset": 0}})
        assert await raw_frame(raw) == golden_frame({"type": "page_add", "page": "table",
                                                     "parameters": {"table_id": 10}})  # since ignored
        await raw.send({"presence": "table", "table_id": 11})  # not subscribed: nothing
        for n in range(1, 4):
            message = rows_created(n)
            server.publish(message)
            assert await raw_frame(raw) == golden_frame(message)
            got = await opted.recv()
            assert got == {**message, "position": got["position"]} and got["position"]["offset"] == n
        big = {**rows_created(4), "rows": [{"id": i, "text": "x" * 50} for i in range(10)]}  # 16-bit length
        server.publish(big)
        assert await raw_frame(raw) == golden_frame(big)
        assert (await opted.recv())["position"]["offset"] == 4
        server.publish({"type": "test_marker", "n": 0}, {"all_users": True})
        assert await raw_frame(raw) == golden_frame({"type": "test_marker", "n": 0})
        assert await opted.recv() == {"type": "test_marker", "n": 0}
    finally:
        raw.close()


def _session(server, positions, user_id):
    """A session of ``server`` without a socket (its queue is read directly)."""
    class Wire:
        def flush(self):
            return 0

        def gone(self):
            return False

    session = Session(server.sessions, Wire())
    session.positions = positions
    assert session.authenticate(make_token(user_id)) is None
    session.receive_frame(1, ujson.dumps({"page": "table", "table_id": 10}))
    session.out.clear()
    return session


@pytest.mark.gen_test
async def test_fan_out_to_non_opted_connections_shares_one_bytes_object(server):
    """Serialized at most twice per message: every plain subscriber's queue holds the very same
    bytes object; the positioned ones share another (no socket needed: the queues are read
    before the loop runs the flush)."""
    plain = [_session(server, False, u) for u in (1, 2, 3)]
    opted = [_session(server, True, u) for u in (1, 2)]
    server.router.dispatch(message_envelope(server.registry, rows_created(1)))
    frames = [s.out[0] for s in plain]
    assert all(f is frames[0] for f in frames) and frames[0] == golden_frame(rows_created(1))
    positioned_frames = [s.out[0] for s in opted]
    assert positioned_frames[0] is positioned_frames[1] and positioned_frames[0] != frames[0]
    epoch = server.history.position("table-10")[0]
    frame = positioned_frames[0]
    assert ujson.loads(frame[4:] if frame[1] == 126 else frame[2:]) == {**rows_created(1), "position": {"epoch": epoch, "offset": 1}}


@pytest.mark.gen_test
async def test_no_history_is_kept_for_a_page_nobody_asked_positions_for(server):
    plain = _session(server, False, 1)
    server.router.dispatch(message_envelope(server.registry, rows_created(1)))
    assert server.history.groups == {} and len(plain.out) == 1


# --- recovery over sockets ---------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_recovery_within_history(server, connect, barrier):
    a = await positioned(connect)
    added = await a.subscribe("table", table_id=10)
    epoch = added["position"]["epoch"]
    assert added == {"type": "page_add", "page": "table", "parameters": {"table_id": 10},
                     "position": {"epoch": epoch, "offset": 0}}
    for n in (1, 2):
        server.publish(rows_created(n))
        assert await a.recv() == {**rows_created(n), "position": {"epoch": epoch, "offset": n}}
    a.close()
    for n in (3, 4):
        server.publish(rows_created(n))
    b = await positioned(connect)
    assert await subscribe_since(b, {"epoch": epoch, "offset": 2}) == {
        "type": "page_add", "page": "table", "parameters": {"table_id": 10}, "recovered": True,
        "position": {"epoch": epoch, "offset": 2}}
    assert await b.recv() == {**rows_created(3), "position": {"epoch": epoch, "offset": 3}}
    assert await b.recv() == {**rows_created(4), "position": {"epoch": epoch, "offset": 4}}
    server.publish(rows_created(5))
    assert await b.recv() == {**rows_created(5), "position": {"epoch": epoch, "offset": 5}}
    # up to date: recovered with nothing to replay
    c = await positioned(connect)
    assert (await subscribe_since(c, {"epoch": epoch, "offset": 5}))["recovered"] is True
    await barrier(b, c)


@pytest.mark.gen_test
async def test_messages_to_a_page_nobody_here_has_open_are_still_recorded(server, connect, barrier):
    """The page's history began (a positioned subscriber) and every subscriber left: the router
    frames nothing for the page but still records each message, so a later ``since`` recovers
    them (issue 16: no frame is built for a page without recipients)."""
    a = await positioned(connect)
    epoch = (await a.subscribe("table", table_id=10))["position"]["epoch"]
    await a.send({"remove_page": "table", "table_id": 10})
    assert (await a.recv())["type"] == "page_discard"
    assert 10 not in server.hub.groups and "table-10" not in server.hub.groups  # nobody here on it
    for n in (1, 2):
        server.publish(rows_created(n))
    assert await subscribe_since(a, {"epoch": epoch, "offset": 0}) == {
        "type": "page_add", "page": "table", "parameters": {"table_id": 10}, "recovered": True,
        "position": {"epoch": epoch, "offset": 0}}
    assert await a.recv() == {**rows_created(1), "position": {"epoch": epoch, "offset": 1}}
    assert await a.recv() == {**rows_created(2), "position": {"epoch": epoch, "offset": 2}}
    await barrier(a)


@pytest.mark.gen_test
@pytest.mark.rt_settings(history_size=2)
async def test_recovery_outside_history_or_after_an_epoch_change(server, connect, barrier):
    a = await positioned(connect)
    epoch = (await a.subscribe("table", table_id=10))["position"]["epoch"]
    for n in (1, 2, 3):
        server.publish(rows_created(n))
        assert (await a.recv())["position"] == {"epoch": epoch, "offset": n}
    b = await positioned(connect)
    # offset 0: message 1 is no longer held (history_size 2)
    assert await subscribe_since(b, {"epoch": epoch, "offset": 0}) == {
        "type": "page_add", "page": "table", "parameters": {"table_id": 10}, "recovered": False,
        "position": {"epoch": epoch, "offset": 3}}
    c = await positioned(connect)
    assert (await subscribe_since(c, {"epoch": epoch, "offset": 1}))["recovered"] is True  # 2 and 3 held
    assert [(await c.recv())["position"]["offset"] for _ in range(2)] == [2, 3]
    others = []
    for since in ({"epoch": "another-epoch", "offset": 1}, {"epoch": epoch, "offset": 9},
                  {"epoch": epoch, "offset": -1}, {"epoch": epoch, "offset": True}, "garbage"):
        d = await positioned(connect)
        reply = await subscribe_since(d, since)
        assert reply["recovered"] is False and reply["position"] == {"epoch": epoch, "offset": 3}, since
        others.append(d)
    await barrier(a, b, c, *others)  # nothing replayed to any of them


@pytest.mark.gen_test
@pytest.mark.rt_settings(history_size=0)
async def test_history_size_0_turns_the_extension_off(server, connect, barrier):
    a = await positioned(connect)
    assert await a.subscribe("table", table_id=10) == {"type": "page_add", "page": "table",
                                                       "parameters": {"table_id": 10}}
    server.publish(rows_created(1))
    assert await a.recv() == rows_created(1)
    await barrier(a)


@pytest.mark.gen_test
async def test_recovery_skips_messages_excluding_the_user(server, connect, barrier):
    a = await positioned(connect, user_id=2)
    epoch = (await a.subscribe("table", table_id=10))["position"]["epoch"]
    a.close()
    server.publish(rows_created(1), exclude_user_ids=[2])
    server.publish(rows_created(2))
    b = await positioned(connect, user_id=2)
    assert (await subscribe_since(b, {"epoch": epoch, "offset": 0}))["recovered"] is True
    assert await b.recv() == {**rows_created(2), "position": {"epoch": epoch, "offset": 2}}
    await barrier(b)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.rt_settings(history_size=1000)
async def test_no_loss_duplication_or_reordering_while_clients_reconnect(server, connect):
    """A publisher publishes 1..N continuously (yielding to the loop between publishes) while three
    clients each drop their connection at different points (without reading what is in flight)
    and resubscribe with the position of the last message they read: each client's concatenated
    sequence is exactly 1..N."""
    total = 300
    drops = {0: (40, 41, 150), 1: (1, 120, 121, 122, 299), 2: (200,)}

    async def publisher():
        for n in range(1, total + 1):
            await server.publish_async(rows_created(n))
            await asyncio.sleep(0)  # barrier-ok: yields to the loop so clients reconnect mid-stream

    async def client(k):
        seen = []
        conn = await positioned(connect, user_id=k + 1)
        added = await conn.subscribe("table", table_id=10)
        position = added["position"]
        while len(seen) < total:
            message = await conn.recv()
            if message["type"] != "rows_created":
                continue
            seen.append(message["rows"][0]["id"])
            position = message["position"]
            if seen[-1] in drops[k]:
                conn.close()  # messages already sent to it are lost with the connection
                conn = await positioned(connect, user_id=k + 1)
                reply = await subscribe_since(conn, position)
                assert reply["recovered"] is True and reply["position"] == position
        conn.close()
        return seen

    clients = [asyncio.ensure_future(client(k)) for k in range(3)]
    await asyncio.sleep(0)  # barrier-ok: lets the clients connect before the first publish
    # every client subscribed before publishing starts (the page_add fixes the start at offset 0)
    while len(server.hub.groups.get("table-10", ())) < 3:
        await asyncio.sleep(0.01)  # barrier-ok: bounded by the test timeout
    await publisher()
    for seen in await asyncio.gather(*clients):
        assert seen == list(range(1, total + 1))


# --- the store without sockets ----------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_history_store_bounds_ttl_and_epochs():
    clock = Clock()
    live = set()
    store = MemoryHistory(3, 10.0, live=live.__contains__, clock=clock)
    assert store.append("g", "{}", None) is None  # no history yet: nobody asked
    epoch, offset = store.position("g")
    assert offset == 0 and isinstance(epoch, str)
    for n in range(1, 6):
        assert store.append("g", '{"n":%d}' % n, None) == (epoch, n)
    assert store.since("g", epoch, 2)[0] is True and [e[0] for e in store.since("g", epoch, 2)[2]] == [3, 4, 5]
    assert store.since("g", epoch, 1) == (False, (epoch, 5), [])  # size 3: 2 is gone
    clock.now += 6
    store.append("g", '{"n":6}', None)
    clock.now += 5  # 3, 4, 5 are older than ttl now; 6 is not
    assert store.since("g", epoch, 5)[0] is True and [e[0] for e in store.since("g", epoch, 5)[2]] == [6]
    assert store.since("g", epoch, 4)[0] is False
    live.add("g")
    clock.now += 100
    store.sweep()
    assert store.position("g")[0] == epoch  # a positioned subscriber is still there
    live.clear()
    clock.now += 100
    store.sweep()
    assert "g" not in store.groups
    assert store.since("g", epoch, 6) == (False, (store.groups["g"].epoch, 0), [])  # a new epoch
    assert store.groups["g"].epoch != epoch


def test_positioned_text_adds_one_key_last():
    assert positioned_text('{"type":"x","a":1}', "e", 7) == '{"type":"x","a":1,"position":{"epoch":"e","offset":7}}'
    # a message that already has the word: decoded, the key replaced (never doubled)
    text = positioned_text('{"type":"x","position":3,"b":{"position":1}}', "e", 8)
    assert ujson.loads(text) == {"type": "x", "position": {"epoch": "e", "offset": 8}, "b": {"position": 1}}
    assert text.count('"position":{"epoch"') == 1


@pytest.mark.gen_test
async def test_a_broker_gap_ends_every_epoch(server, connect):
    """When the broker reports lost envelopes (the Redis broker's gap handler), every page is
    discarded and a since from before the gap is not recovered: the lost ones may be missing."""
    a = await positioned(connect)
    epoch = (await a.subscribe("table", table_id=10))["position"]["epoch"]
    server.publish(rows_created(1))
    assert (await a.recv())["position"] == {"epoch": epoch, "offset": 1}
    assert server.broker.on_gap() == 1  # what the Redis broker calls on a gap
    assert await a.recv() == {"type": "page_discard", "page": "table", "parameters": {"table_id": 10}}
    reply = await subscribe_since(a, {"epoch": epoch, "offset": 1})
    assert reply["recovered"] is False and reply["position"]["epoch"] != epoch
