"""A publisher's own inbox holds references, not bytes (issue 16, item 5): the publish script
appends to the inbox of the process that published only references (field R: ranges
``<first>:<last>;`` of consecutive sequence numbers, ``<seq>,<epoch>,<offset>;`` with a history
position) to its page messages, and that process delivers the envelope it kept when the reader
reaches the reference, so its place in the merged order is still the one Redis gave it.

* Two processes publish interleaved to one page watched on three processes (the publishers and a
  third that only reads): every subscriber sees one and the same order, each publisher's own
  messages in its call order; the publishers read their own messages back as references.
* Across a Redis restart without persistence the references go on working: every message
  published after it reaches every subscriber once, the publisher's through references again
  once routing is back on.
* Without sockets: a reference delivers the pending envelope with its history position; an
  envelope whose deadline passed before the reader reached its reference is kept until then;
  references lost with a trimmed inbox free what they named.

Non-delivery is proved with a marker that must be the next message received.
"""
import asyncio
import time

import pytest
import redis as redis_sync

from redis_fixtures import marker_message, redis_server, require_redis_package  # noqa: F401
from test_redis_routing import DIRECTORY, PREFIX, rows_updated, stats, ujson_rows
from test_redis_streams import cluster, connect, marker_to_all, metrics, rows_created  # noqa: F401


def _ids(message):
    return message["rows"][0]["id"]


@pytest.mark.gen_test(timeout=60)
async def test_interleaved_publishes_of_two_processes_reach_every_subscriber_in_one_order(connect):  # noqa: F811
    with cluster(connect, 3) as (redis, (a, b, c)):
        await a.put_directory(DIRECTORY)
        clients = [await connect(node, user) for node, user in ((a, 1), (b, 2), (c, 3))]
        for client in clients:
            await client.subscribe("table", table_id=10)
        rounds, size = 20, 25

        async def publish_from(node, base):
            for r in range(rounds):
                await node.publish([{"message": rows_updated(10, base + r * size + i)} for i in range(size)])

        await asyncio.gather(publish_from(a, 0), publish_from(b, 100_000))
        total = 2 * rounds * size
        orders = [[_ids(await client.recv()) for _ in range(total)] for client in clients]
        await marker_to_all(a, *clients)  # nothing more (no duplicate) came before it
        assert orders[0] == orders[1] == orders[2]
        order = orders[0]
        assert [i for i in order if i < 100_000] == list(range(rounds * size))
        assert [i for i in order if i >= 100_000] == [100_000 + i for i in range(rounds * size)]

        raw = redis_sync.Redis.from_url(redis.url)
        try:
            # The publishers' inboxes hold references to their own publishes and the bytes of the
            # other's; C's inbox only bytes.
            kinds = [{"refs" if field == b"R" else "bytes" for _, entry in raw.xrange(key) for field in entry
                      if field in (b"R", b"e") or field.startswith(b"m")}
                     for key in raw.keys(f"{PREFIX}:inbox:*")]
        finally:
            raw.close()
        assert sorted(map(sorted, kinds)) == [["bytes"], ["bytes", "refs"], ["bytes", "refs"]], kinds
        for node in (a, b, c):
            seen = await stats(node)
            assert seen["inbox_envelopes"] == total and seen["dropped"] == 0 and seen["control_pages"] == 0, seen
        for node in (a, b, c):
            assert "no longer holds" not in node.log_text()


@pytest.mark.gen_test(timeout=90)
async def test_references_survive_a_redis_restart_without_persistence(connect):  # noqa: F811
    """Redis restarted empty: the inboxes and registrations are gone. Page messages go on the
    control stream (bytes) until routing is on again, then A's own come back as references:
    every message reaches both subscribers once, in publish order, nothing is lost."""
    require_redis_package()
    with cluster(connect, 2, serve_args=["--presence-ttl", "1.5"]) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_a, on_b = await connect(a, 1), await connect(b, 2)
        await on_a.subscribe("table", table_id=10)
        await on_b.subscribe("table", table_id=10)
        await a.publish([{"message": rows_created(10, i)} for i in range(10)])
        for client in (on_a, on_b):
            assert [_ids(await client.recv()) for _ in range(10)] == list(range(10))
        before = (await stats(a))["inbox_envelopes"]
        assert before == 10

        redis.restart()  # SIGKILL, then a fresh redis-server without data on the same port
        sent = 10
        deadline = time.monotonic() + 30
        # Publish one message at a time through A until A reads its own through its inbox again
        # (routing back on after the grace); every one must reach both clients, in order.
        while True:
            assert time.monotonic() < deadline, "routing did not come back after the restart"
            status, _ = await a.call("POST", "/api/publish", {"message": rows_created(10, sent)})
            if status == 503:  # A's publisher has not reconnected yet: nothing was applied
                await asyncio.sleep(0.05)  # barrier-ok: bounded poll for the reconnect
                continue
            assert status == 200, status
            for client in (on_a, on_b):
                got = await client.recv()
                assert got["type"] == "rows_created" and _ids(got) == sent, (client.node.name, got)
            sent += 1
            if (await stats(a))["inbox_envelopes"] > before:
                break
            await asyncio.sleep(0.05)  # barrier-ok: paces the polling publishes, nothing asserted on time
        # Routed again: a batch comes back to A as references, to B as bytes, in order.
        await a.publish([{"message": rows_created(10, sent + i)} for i in range(20)])
        for client in (on_a, on_b):
            assert [_ids(await client.recv()) for _ in range(20)] == list(range(sent, sent + 20))
        await marker_to_all(b, on_a, on_b)
        seen_a = await metrics(a)
        assert seen_a["tornado_rt_redis_gaps_total"] == 0
        assert "no longer holds" not in a.log_text()


def test_references_deliver_the_kept_envelope_in_place_and_free_what_lost_ones_named():
    """The reader's side of field R, without sockets: a reference delivers the pending envelope
    (its future completes) with its history position; one whose deadline passed first is kept
    until its reference is read; a reference lost with a trimmed inbox (a gap in c) frees the
    envelope it named when a later one is read; an envelope past its deadline whose reference
    cannot come any more (a later one was read) is not kept."""
    from tornado_rt.envelope import message_envelope
    from tornado_rt.redis_broker import RedisBroker, _Pending
    from tornado_rt.registry import Registry
    from tornado_rt.server import builtin_plugins

    registry = Registry(builtin_plugins())
    loop = asyncio.new_event_loop()
    try:
        broker = RedisBroker("redis://127.0.0.1:1")  # never connected
        broker._loop = loop
        delivered, gaps = [], []
        broker.attach(delivered.append)
        broker.on_gap = lambda: gaps.append(1) or 0
        envelopes = {seq: message_envelope(registry, rows_created(10, seq)) for seq in range(1, 7)}
        now = loop.time()
        for seq, envelope in envelopes.items():
            entry = _Pending(loop.create_future(), now + (-1 if seq <= 2 else 100), envelope)
            entry.accepted = -1  # routed to this process's own inbox (as a reference)
            broker._pending[seq] = entry
        futures = {seq: entry.future for seq, entry in broker._pending.items()}
        broker._expire()  # publishes 1 and 2 passed their deadline before the reader got to them
        assert futures[1].done() and futures[2].done() and list(broker._own) == [1, 2]
        assert list(broker._pending) == [3, 4, 5, 6]

        broker._on_inbox([(b"5-1", [b"t", b"1000", b"c", b"1", b"R", b"1,ep,4;2,,;3,ep,5;"])])
        assert [ujson_rows(env) for env in delivered] == [1, 2, 3]
        assert [env.position for env in delivered] == [("ep", 4), None, ("ep", 5)]
        assert futures[3].done() and not futures[4].done() and broker._own == {}
        assert broker.inbox_envelopes == 3
        # Entry c=2 (the reference to 4) was trimmed before this process read it: a gap.
        broker._on_inbox([(b"7-1", [b"t", b"1000", b"c", b"3", b"R", b"5,,;"])])
        assert gaps == [1] and broker.gaps == 1 and ujson_rows(delivered[-1]) == 5
        # 4's reference cannot come any more (5's was read): not kept past its deadline; 6 is.
        broker._pending[4].deadline = broker._pending[6].deadline = now - 1
        broker._expire()
        assert futures[4].done() and futures[6].done() and list(broker._own) == [6]
        # A reference to a publish this process no longer holds: logged, nothing delivered;
        # 6's reference was lost (it is lower than one read): freed.
        broker._on_inbox([(b"9-1", [b"t", b"1000", b"c", b"4", b"R", b"9,,;"])])
        assert len(delivered) == 4 and broker._own == {} and broker._pending == {}
    finally:
        loop.close()


def test_inbox_entries_with_a_field_per_envelope_are_read_back_with_their_positions():
    """Several page messages of one publish call to another process's inbox: a field per envelope
    ("m", or "m<epoch>,<offset>" when it joined a history), not one concatenated value; without
    sockets. A field that is not an envelope ends the entry (logged), the entry number still counts."""
    from tornado_rt.envelope import message_envelope
    from tornado_rt.redis_broker import RedisBroker, encode_envelope
    from tornado_rt.registry import Registry
    from tornado_rt.server import builtin_plugins

    registry = Registry(builtin_plugins())
    broker = RedisBroker("redis://127.0.0.1:1")  # never connected
    delivered, gaps = [], []
    broker.attach(delivered.append)
    broker.on_gap = lambda: gaps.append(1) or 0
    payloads = [encode_envelope(message_envelope(registry, rows_created(10, i)), "other", i) for i in range(5)]
    broker._on_inbox([
        (b"5-1", [b"t", b"1000", b"c", b"1", b"m", payloads[0], b"mep,7", payloads[1], b"m", payloads[2]]),
        (b"6-1", [b"t", b"1000", b"c", b"2", b"m", payloads[3], b"x", payloads[4]]),
    ])
    assert [ujson_rows(env) for env in delivered] == [0, 1, 2, 3]
    assert [env.position for env in delivered] == [None, ("ep", 7), None, None]
    assert broker.inbox_read == 2 and broker.inbox_envelopes == 4 and gaps == [] and broker.gaps == 0


@pytest.mark.gen_test(timeout=20)
async def test_the_history_marker_outlives_every_position_it_covers(redis_server):  # noqa: F811
    """The publish script skips the per-envelope history lookup while <prefix>:hists is absent,
    so the marker must exist (and expire no earlier) whenever a page's position key does: set
    with the position (a new epoch), not shortened by a caller with a shorter TTL, and set again
    by the next position call when it was gone. (The publish script refreshes it too: covered by
    tests/test_redis_recovery.py, whose messages would get no offset without it.)"""
    import redis.asyncio as aioredis

    from tornado_rt.redis_history import RedisHistory

    prefix = "hists-marker-test"
    raw = aioredis.from_url(redis_server.url)
    long_lived = RedisHistory(redis_server.url, prefix, ttl=300.0)
    short_lived = RedisHistory(redis_server.url, prefix, ttl=5.0)
    try:
        await raw.delete(f"{prefix}:hists", f"{prefix}:pos:table-1", f"{prefix}:pos:table-2")
        epoch, offset = await long_lived.position("table-1")
        assert offset == 0

        async def expires_at(key: str) -> int:
            # the absolute expiry (ms since the epoch): two PTTL reads a moment apart would
            # compare remaining times taken at different instants
            return int(await raw.execute_command("PEXPIRETIME", key))

        pos_at = await expires_at(f"{prefix}:pos:table-1")
        assert pos_at > 0
        assert await expires_at(f"{prefix}:hists") >= pos_at
        await short_lived.position("table-2")  # a 5 s TTL must not shorten the 300 s marker
        assert await expires_at(f"{prefix}:hists") >= pos_at
        assert await raw.pttl(f"{prefix}:hists") > 5000
        await raw.delete(f"{prefix}:hists")  # the marker gone: the next position call sets it again
        await long_lived.position("table-1")
        assert await expires_at(f"{prefix}:hists") >= await expires_at(f"{prefix}:pos:table-1") > 0
    finally:
        await raw.delete(f"{prefix}:hists", f"{prefix}:pos:table-1", f"{prefix}:pos:table-2",
                         f"{prefix}:hist:table-1", f"{prefix}:hist:table-2")
        await raw.aclose()
        await long_lived.redis.aclose()
        await short_lived.redis.aclose()
