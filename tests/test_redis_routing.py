"""Routing of page messages over Redis (issue 16, item 5): a plain page message goes only to the
inbox streams of the processes registered for its page group, merged with the control stream in
publish order; against a real ``redis-server`` and real ``tornado-rt serve`` subprocesses, plus
the merge rule and the routing decision as pure logic.

* Pages watched only on A: B reads none of their messages (its counters say so), A's clients get
  every one in order, and a marker through the control stream proves the end.
* A subscription is confirmed (page_add) only once Redis registered the process: a message
  published through another process right after page_add is never missed (100 fresh pages).
* Publish order holds across the two streams: a page message, a message with a side effect
  (control stream), a page message on another page.
* A stalled process (SIGSTOP) delivers everything that went to its inbox meanwhile, in order;
  a process that falls behind its trimmed inbox gets page_discard and counts the gap.
* A killed process's registrations and inbox are swept by the others once its alive key
  expired.

Non-delivery is always proved with a marker that must be the next message received.
"""
import asyncio
import signal
import time

import pytest
import redis as redis_sync

from redis_fixtures import marker_message, redis_server, require_redis_package  # noqa: F401
from test_redis_streams import (cluster, connect, marker_to_all, metrics, rows_created,  # noqa: F401
                                stopped)
from tornado_rt.redis_broker import entry_key, merge_replies, route_of

PREFIX = "tornado-rt"
TABLES = list(range(100, 221))
DIRECTORY = {"workspaces": {"1": [1, 2, 3]}, "tables": {str(t): 1 for t in [10, 11, *TABLES]},
             "public_views": {}}


async def stats(node):
    status, body = await node.call("GET", "/api/stats")
    assert status == 200, status
    return body["redis"]


def rows_updated(table_id, i):
    return {"type": "rows_updated", "table_id": table_id, "rows_before_update": [{"id": i}],
            "rows": [{"id": i, "v": 1}], "metadata": {}, "updated_field_ids": []}


# --- pure logic -------------------------------------------------------------------------------------

def _entries(*ids):
    return [(i.encode(), [b"t", b"0", b"e", i.encode()]) for i in ids]


def test_merge_orders_both_streams_by_id_and_holds_what_a_cut_stream_may_precede():
    control = _entries("5-0", "7-0", "9-0")
    inbox = _entries("5-1", "6-1", "6-2", "9-1", "12-1")
    # Neither reply cut at COUNT: everything, in id order (a control entry n before inbox n-k).
    ready, held_c, held_i = merge_replies(control, False, inbox, False)
    assert [e[0].decode() for _, e in ready] == ["5-0", "5-1", "6-1", "6-2", "7-0", "9-0", "9-1", "12-1"]
    assert [src for src, _ in ready] == [False, True, True, True, False, False, True, True]
    assert held_c == [] and held_i == []
    # The control reply was cut after 9-0: inbox entries after it wait (a control entry 10 or 11
    # may exist unseen and must come first).
    ready, held_c, held_i = merge_replies(control, True, inbox, False)
    assert [e[0] for _, e in ready][-1] == b"9-0" and held_c == [] and [e[0] for e in held_i] == [b"9-1", b"12-1"]
    # The inbox reply was cut after 12-1: the control stream was returned up to now, all is ready.
    ready, held_c, held_i = merge_replies(control, False, inbox, True)
    assert len(ready) == 8 and held_c == [] and held_i == []
    # Both cut: up to the smaller last id.
    ready, held_c, held_i = merge_replies(_entries("5-0", "20-0"), True, _entries("6-1", "7-1"), True)
    assert [e[0] for _, e in ready] == [b"5-0", b"6-1", b"7-1"] and [e[0] for e in held_c] == [b"20-0"]
    assert held_i == []
    # Held entries come back first in the next round and merge with the new ones.
    ready, held_c, held_i = merge_replies(held_c + _entries("21-0"), False, _entries("20-1"), False)
    assert [e[0] for _, e in ready] == [b"20-0", b"20-1", b"21-0"]
    # One stream empty and cut-flags off: plain order.
    ready, _, _ = merge_replies([], False, inbox, False)
    assert [e for _, e in ready] == inbox
    assert entry_key(b"17-3") == (17, 3) and entry_key(b"17") == (17, 0) and entry_key(b"junk") == (0, 0)


def test_only_plain_page_messages_are_routed():
    from tornado_rt import Plugin
    from tornado_rt.envelope import DIRECTORY as DIRECTORY_KIND, Envelope, message_envelope
    from tornado_rt.registry import MessageType, PageType, Registry
    from tornado_rt.server import builtin_plugins

    effects = Plugin("effects", page_types=[PageType("sheet", ("sheet_id",), "sheet-{sheet_id}", lambda *args: True)],
                     message_types=[MessageType("sheet_gone", "page", page="sheet", keys={"sheet_id": "sheet_id"},
                                                payload=("sheet_id",), effect=lambda ctx, message: None)])
    registry = Registry(builtin_plugins() + [effects])
    page = message_envelope(registry, rows_created(10, 1))
    assert route_of(page, registry) == ("table-10", True)
    assert route_of(page, None) == ("table-10", False)  # no registry: the control stream
    # A page message whose type has a side effect is applied by every process: control stream.
    assert route_of(message_envelope(registry, {"type": "sheet_gone", "sheet_id": 4}), registry) == ("sheet-4", False)
    users = message_envelope(registry, rows_created(10, 1), {"user_ids": [1]})
    assert route_of(users, registry) == ("", False)
    workspace = message_envelope(registry, {"type": "table_deleted", "database_id": 1, "table_id": 10})
    assert route_of(workspace, registry) == ("", False)
    assert route_of(Envelope(DIRECTORY_KIND, type="load", data="[]"), registry) == ("", False)


# --- two processes ----------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_pages_watched_only_on_a_never_reach_b(connect):  # noqa: F811
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_10 = await connect(a, 1)
        on_11 = await connect(a, 2)
        on_b = await connect(b, 3)  # on no page: it gets only the marker
        await on_10.subscribe("table", table_id=10)
        await on_11.subscribe("table", table_id=11)
        total = 1000
        for start in range(0, total, 100):
            await a.publish([{"message": rows_created(10 + (i % 2), i)} for i in range(start, start + 100)])
        for client, parity in ((on_10, 0), (on_11, 1)):
            got = [(await client.recv())["rows"][0]["id"] for _ in range(total // 2)]
            assert got == [i for i in range(total) if i % 2 == parity]
        await marker_to_all(a, on_10, on_11, on_b)  # through the control stream: B read it

        seen_a, seen_b = await stats(a), await stats(b)
        assert seen_b["inbox_read"] == seen_b["inbox_envelopes"] == 0 and seen_b["control_pages"] == 0, seen_b
        assert seen_b["control_read"] >= 2 and seen_b["registered"] == 0, seen_b  # directory + marker
        assert seen_a["inbox_envelopes"] == total and seen_a["control_pages"] == 0 and seen_a["dropped"] == 0, seen_a
        assert 1 <= seen_a["inbox_read"] <= total  # an entry holds the page messages of one publish call
        assert seen_a["registered"] == 2
        exposed = await metrics(b)
        assert exposed["tornado_rt_redis_inbox_read_total"] == 0
        assert exposed["tornado_rt_redis_control_pages_total"] == 0


@pytest.mark.gen_test(timeout=90)
async def test_a_message_published_right_after_page_add_is_never_missed(connect):  # noqa: F811
    """A client on B subscribes to a page nobody watched; the moment it has page_add, a message
    is published through A. 100 fresh pages: every message arrives (page_add waits for B's
    registration in Redis), and the marker after it proves nothing else came."""
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_b = await connect(b, 1)
        for n, table in enumerate(TABLES[:100]):
            await on_b.subscribe("table", table_id=table)
            message = rows_created(table, n)
            await a.publish({"message": message})
            assert await on_b.recv() == message, f"table {table}: the message published after page_add was missed"
        await marker_to_all(a, on_b)
        assert (await stats(b))["registered"] == 100


@pytest.mark.gen_test(timeout=60)
async def test_publish_order_holds_between_the_control_stream_and_the_inbox(connect):  # noqa: F811
    """rows_updated (inbox), table_deleted to the same page (a side effect: control stream), then
    rows_created on another page (inbox), in one batch and in three requests: B's client sees
    them in publish order, the side effect (page_discard of the deleted table) in its place."""
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_b = await connect(b, 1)
        for round_, tables in enumerate(((100, 101), (102, 103))):
            first, second = tables
            await on_b.subscribe("table", table_id=first)
            await on_b.subscribe("table", table_id=second)
            updated = rows_updated(first, 1)
            deleted = {"type": "table_deleted", "database_id": 1, "table_id": first}
            created = rows_created(second, 2)
            items = [{"message": updated}, {"message": deleted, "to": {"page": "table", "table_id": first}},
                     {"message": created}]
            if round_ == 0:
                await a.publish(items)
            else:
                for item in items:
                    await a.publish(item)
            assert await on_b.recv() == updated
            assert await on_b.recv() == deleted
            assert await on_b.recv() == {"type": "page_discard", "page": "table", "parameters": {"table_id": first}}
            assert await on_b.recv() == created
        await marker_to_all(a, on_b)
        seen = await stats(b)
        assert seen["control_pages"] == 2 and seen["inbox_envelopes"] == 4, seen


@pytest.mark.gen_test(timeout=90)
async def test_a_stopped_process_delivers_everything_its_inbox_got_meanwhile(connect):  # noqa: F811
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_b = await connect(b, 1)
        await on_b.subscribe("table", table_id=10)
        await on_b.subscribe("table", table_id=11)
        total = 2000
        with stopped(b.proc):
            for start in range(0, total, 200):
                await a.publish([{"message": rows_created(10 + (i % 3 == 0), i)} for i in range(start, start + 200)])
        marker = marker_message()
        await a.publish({"message": marker, "to": {"all_users": True}})
        got = []
        while (message := await on_b.recv()) != marker:
            got.append(message["rows"][0]["id"])
        assert got == list(range(total))
        seen = await stats(b)
        assert seen["inbox_envelopes"] == total and seen["dropped"] == 0, seen
        assert (await metrics(b))["tornado_rt_redis_gaps_total"] == 0


@pytest.mark.gen_test(timeout=90)
async def test_a_gap_in_the_inbox_sends_page_discard_and_is_counted(connect):  # noqa: F811
    """B stopped while its inbox is trimmed past what it read (a short stream length): B's client
    gets what B had read, in order, then page_discard; the gap is counted, A has none."""
    with cluster(connect, 2, serve_args=["--redis-stream-length", "50"]) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_b = await connect(b, 1)
        await on_b.subscribe("table", table_id=10)
        total = 2000
        with stopped(b.proc):
            for start in range(0, total, 50):  # the first batch is not trimmed before B reads it
                await a.publish([{"message": rows_created(10, i)} for i in range(start, start + 50)])
        received = []
        while (got := await on_b.recv())["type"] == "rows_created":
            received.append(got["rows"][0]["id"])
        assert received == list(range(len(received))) and len(received) < total
        assert got == {"type": "page_discard", "page": "table", "parameters": {"table_id": 10}}
        await marker_to_all(a, on_b)
        seen_b, seen_a = await metrics(b), await metrics(a)
        assert seen_b["tornado_rt_redis_gaps_total"] == 1 and seen_b["tornado_rt_redis_envelopes_lost_total"] >= 1
        assert seen_a["tornado_rt_redis_gaps_total"] == 0
        assert f"{PREFIX}:inbox:" in b.log_text() and "page_discard for 1 page subscriptions" in b.log_text()
        # Resubscribed, B's client gets the next message.
        await on_b.subscribe("table", table_id=10)
        after = rows_created(10, total)
        await a.publish({"message": after})
        assert await on_b.recv() == after


@pytest.mark.gen_test(timeout=60)
async def test_a_killed_process_is_swept_from_redis(connect):  # noqa: F811
    """A process killed with SIGKILL cannot clean up: once its alive key expired (presence_ttl,
    short here), a live process removes its registrations and its inbox; a process that stops
    normally removes its own at once."""
    require_redis_package()
    with cluster(connect, 3, serve_args=["--presence-ttl", "1.5"]) as (redis, (a, b, c)):
        await a.put_directory(DIRECTORY)
        on_b = await connect(b, 1)
        on_c = await connect(c, 2)
        await on_b.subscribe("table", table_id=10)
        await on_c.subscribe("table", table_id=11)
        await a.publish([{"message": rows_created(10, 1)}, {"message": rows_created(11, 1)}])
        assert (await on_b.recv())["table_id"] == 10 and (await on_c.recv())["table_id"] == 11
        raw = redis_sync.Redis.from_url(redis.url)
        try:
            origins = {key.decode().rsplit(":", 1)[1] for key in raw.keys(f"{PREFIX}:inbox:*")}
            assert len(origins) == 2
            assert raw.hkeys(f"{PREFIX}:g:table-10") and raw.hkeys(f"{PREFIX}:g:table-11")
            (b_origin,) = [o.decode() for o in raw.hkeys(f"{PREFIX}:g:table-10")]
            (c_origin,) = [o.decode() for o in raw.hkeys(f"{PREFIX}:g:table-11")]
            # the publish script's mirrors of both inboxes' last entries (<prefix>:itops)
            assert sorted(raw.hkeys(f"{PREFIX}:itops")) == sorted([b_origin.encode(), c_origin.encode()])
            b.proc.send_signal(signal.SIGKILL)
            b.proc.wait()
            on_c.close()  # else the graceful stop waits for it (and is cut short by SIGKILL)
            c.stop()  # graceful: removes its own keys
            assert not raw.sismember(f"{PREFIX}:procs", c_origin) and not raw.exists(f"{PREFIX}:inbox:{c_origin}")
            assert not raw.hexists(f"{PREFIX}:itops", c_origin)
            assert raw.hkeys(f"{PREFIX}:g:table-11") == []
            deadline = time.monotonic() + 20
            while raw.exists(f"{PREFIX}:inbox:{b_origin}") or raw.hkeys(f"{PREFIX}:g:table-10"):
                assert time.monotonic() < deadline, "the killed process's keys were not swept"
                await asyncio.sleep(0.1)  # barrier-ok: bounded poll for the sweep, nothing asserted on time
            assert not raw.sismember(f"{PREFIX}:procs", b_origin)
            assert not raw.exists(f"{PREFIX}:groups:{b_origin}")
            assert raw.keys(f"{PREFIX}:inbox:*") == []
            assert not raw.exists(f"{PREFIX}:itops")  # the swept process's mirror went with its inbox
        finally:
            raw.close()
        assert (await stats(a))["swept"] == 1
        on_b.close()


def test_inbox_entries_are_read_back_with_their_positions_and_gaps_found():
    """The reader's side of the inbox format, without sockets: one envelope as on the control
    stream (e, p, q), several in one field (E: "<length>,<epoch>,<offset>;" then the envelope),
    the entry number c checked for gaps."""
    from tornado_rt.envelope import message_envelope
    from tornado_rt.redis_broker import RedisBroker, encode_envelope
    from tornado_rt.registry import Registry
    from tornado_rt.server import builtin_plugins

    registry = Registry(builtin_plugins())
    broker = RedisBroker("redis://127.0.0.1:1")  # never connected
    delivered, gaps = [], []
    broker.attach(delivered.append)
    broker.on_gap = lambda: gaps.append(1) or 0
    payloads = [encode_envelope(message_envelope(registry, rows_created(10, i)), "other", i) for i in range(4)]
    blob = (b"%d,ep,7;" % len(payloads[1]) + payloads[1] + b"%d,,;" % len(payloads[2]) + payloads[2])
    broker._on_inbox([
        (b"5-1", [b"t", b"1000", b"c", b"1", b"e", payloads[0], b"p", b"ep", b"q", b"6"]),
        (b"5-2", [b"t", b"1000", b"c", b"2", b"E", blob]),
    ])
    assert [ujson_rows(env) for env in delivered] == [0, 1, 2]
    assert [env.position for env in delivered] == [("ep", 6), ("ep", 7), None]
    assert broker.inbox_read == 2 and broker.inbox_envelopes == 3 and gaps == [] and broker.gaps == 0
    # Entry 3 was trimmed before this process read it: a gap of one entry, page_discard.
    broker._on_inbox([(b"9-1", [b"t", b"1000", b"c", b"4", b"e", payloads[3]])])
    assert gaps == [1] and broker.gaps == 1 and broker.lost == 1 and ujson_rows(delivered[-1]) == 3


def ujson_rows(envelope):
    import ujson
    return ujson.loads(envelope.data)["rows"][0]["id"]


@pytest.mark.gen_test(timeout=30)
async def test_a_joined_group_stays_registered_the_registrar_goes_idle_and_the_last_leave_unregisters(redis_server):  # noqa: F811,E501
    """Every registration is followed by an "unregister unless a subscriber joined" check after
    UNREGISTER_DELAY: with a subscriber it keeps the group and the registrar goes idle (no timer,
    nothing pending); once the last subscriber left, the group is unregistered."""
    import ujson
    from tornado.websocket import websocket_connect

    from redis_fixtures import token
    from test_redis import InProcess

    node = InProcess(redis_server.url)
    await node.server.start()
    broker = node.server.broker

    async def until(condition, what):
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)  # barrier-ok: bounded poll of the registrar's state

    try:
        conn = await websocket_connect(f"{node.ws_url}?jwt_token={token(1)}")
        assert ujson.loads(await conn.read_message())["type"] == "authentication"
        await conn.write_message(ujson.dumps({"page": "table", "table_id": 10}))
        assert ujson.loads(await conn.read_message())["type"] == "page_add"
        await until(lambda: not broker._unwanted and broker._reg_timer is None, "the registrar never went idle")
        assert broker._registered == {"table-10"} and broker.unregistrations == 0
        conn.close()
        await until(lambda: not broker._registered, "the group was not unregistered after its last subscriber left")
        assert broker.unregistrations == 1 and broker.registrations == 1
    finally:
        await node.stop()
