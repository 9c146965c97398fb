"""The Redis reader's turns (issue 16, item 5): a blocking ``XREAD`` answered with this process's
inbox entries alone, none of which can have an unread control stream entry before it, is
delivered at once: one ``XREAD`` per publish batch that reached only inboxes, not a second one to
learn what the control stream holds. Against a real ``redis-server`` and two servers with their
``RedisBroker`` in this test's loop (long ``BLOCK`` time: no read times out during a test, so
Redis's own ``INFO commandstats`` count of XREAD is exact):

* Batches of page messages through A to A's own pages (references in A's inbox) and through B to
  A's pages (envelopes in A's inbox): Redis counts exactly one XREAD per batch (two before), and
  A's clients get every message once, in order.
* Batches mixing page messages and control stream envelopes (user messages, a table_deleted
  with its side effect), through A and through B: every client gets them in publish order, the
  page_discard right after the table_deleted.

Non-delivery is always proved with a marker that must be the next message received.
"""
import asyncio

import pytest

from redis_fixtures import RedisProcess, marker_message, require_redis_binary, require_redis_package
from test_redis import InProcess
from test_redis_streams import connect, rows_created  # noqa: F401
from tornado_rt.envelope import message_envelope

TABLES = [10, 11, 12, 13]
DIRECTORY = {"workspaces": {"1": [1, 2, 3]}, "tables": {str(t): 1 for t in TABLES}, "public_views": {}}
BATCHES = 12


class Node(InProcess):
    """A RealtimeServer with a RedisBroker on the test's loop, listening on a free port. Its reader
    blocks up to 600 s (the BLOCK time is the smaller of health_check_interval and a third of
    presence_ttl): within a test no read ends by timing out."""

    def __init__(self, redis_url, prefix):
        super().__init__(redis_url, prefix, directory=DIRECTORY, settings={"presence_ttl": 3600.0},
                         health_check_interval=600.0)

    async def publish(self, items):
        """One batch (one script call to Redis): ``items`` of (message, audience or None); returns
        after local delivery, as ``POST /api/publish`` does."""
        registry = self.server.registry
        done = self.server.submit_now([message_envelope(registry, message, to) for message, to in items])
        if not isinstance(done, int):
            await done



async def _blocked(raw, readers):
    """Wait until ``readers`` clients are blocked in Redis (each node's reader in its XREAD), so
    that every XREAD sent so far is counted and none is on its way."""
    for _ in range(1000):
        if (await raw.info("clients"))["blocked_clients"] == readers:
            return
        await asyncio.sleep(0.01)  # barrier-ok: waits for a condition, asserts nothing about time
    raise AssertionError("the readers did not block in XREAD")


async def _xreads(raw):
    return int((await raw.info("commandstats")).get("cmdstat_xread", {}).get("calls", 0))


async def _marker(via, *clients):
    marker = marker_message()
    await via.publish([(marker, {"user_ids": [1, 2, 3]})])
    for client in clients:
        got = await client.recv()
        assert got == marker, f"expected nothing before the marker, got {str(got)[:300]}"


async def _two_nodes(redis, prefix):
    a, b = Node(redis.url, prefix), Node(redis.url, prefix)
    await a.server.start()
    await b.server.start()
    return a, b


@pytest.mark.gen_test(timeout=60)
async def test_a_batch_that_reaches_only_inboxes_costs_one_xread_and_arrives_in_order(connect):  # noqa: F811
    import redis.asyncio as aioredis

    require_redis_package()
    redis = RedisProcess(require_redis_binary()).start()
    raw = aioredis.from_url(redis.url)
    a = b = None
    try:
        a, b = await _two_nodes(redis, "turns-count")
        on_a = await connect(a, 1)
        for table in (10, 11):
            await on_a.subscribe("table", table_id=table)
        on_b = await connect(b, 2)  # on no page: B's inbox gets nothing below
        # warm-up through both (a publisher's first publish to a page teaches it the route)
        await a.publish([(rows_created(10, -1), None), (rows_created(11, -2), None)])
        await b.publish([(rows_created(10, -3), None), (rows_created(11, -4), None)])
        assert [(m["table_id"], m["rows"][0]["id"]) for m in [await on_a.recv() for _ in range(4)]] == \
            [(10, -1), (11, -2), (10, -3), (11, -4)]

        for via, origin in ((a, "A's own: references"), (b, "B's: envelopes")):
            await _blocked(raw, 2)
            before = await _xreads(raw)
            expected = []
            for i in range(BATCHES):
                batch = [(rows_created(10 + j % 2, 100 * i + j), None) for j in range(20)]
                await via.publish(batch)
                expected += [message for message, _ in batch]
                # A delivered the batch before the next one is published: each is its own read
                assert [await on_a.recv() for _ in batch] == [message for message, _ in batch]
            await _blocked(raw, 2)
            reads = await _xreads(raw) - before
            # A: one XREAD per batch (it was two: the blocking one, then one for the control
            # stream); B: none (nothing for it arrived: its XREAD stays blocked, counted once).
            assert reads == BATCHES, (origin, reads)
        await _marker(a, on_a, on_b)
        assert a.server.broker.gaps == b.server.broker.gaps == 0
    finally:
        for node in (a, b):
            if node is not None:
                await node.stop()
        await raw.aclose()
        redis.kill()


@pytest.mark.gen_test(timeout=60)
async def test_page_messages_keep_their_place_between_control_envelopes_without_a_second_read(connect):  # noqa: F811
    require_redis_package()
    redis = RedisProcess(require_redis_binary()).start()
    a = b = None
    try:
        a, b = await _two_nodes(redis, "turns-order")
        on_a = await connect(a, 1)
        for table in TABLES:
            await on_a.subscribe("table", table_id=table)
        on_b = await connect(b, 2)
        await on_b.subscribe("table", table_id=10)
        n = 0

        def page(table):
            nonlocal n
            n += 1
            return rows_created(table, n), None

        def to_users(i):
            return {"type": "notifications_fetch_required", "n": i}, {"user_ids": [1, 2]}

        rounds = [
            # page messages only (inbox entries of A, and of B for table 10), then user messages
            # only (control stream), then each kind alternating within one batch
            [page(10), page(11), page(10)],
            [to_users(1), to_users(2)],
            [page(11), to_users(3), page(10), page(12), to_users(4), page(10)],
            [page(10)],
            [to_users(5), page(11), page(10)],
            [page(12), page(10), ({"type": "table_deleted", "database_id": 1, "table_id": 13},
                                  {"page": "table", "table_id": 13}), page(11), page(10)],
            [page(10), page(11)],
        ]
        expected_a, expected_b = [], []
        for r, items in enumerate(rounds):
            via = a if r % 2 == 0 else b
            await via.publish(items)
            for message, to in items:
                if message["type"] == "rows_created" or to.get("user_ids") or message["type"] == "table_deleted":
                    expected_a.append(message)
                if message["type"] == "table_deleted":
                    expected_a.append({"type": "page_discard", "page": "table", "parameters": {"table_id": 13}})
                if (message["type"] == "rows_created" and message["table_id"] == 10) or (to or {}).get("user_ids"):
                    expected_b.append(message)
        # then the same rounds again, without the table_deleted, handed over back to back without
        # waiting in between (the reader sees them in whatever replies Redis makes of them): all
        # through A, then all through B (a publisher's call order is the publish order)
        for via in (a, b):
            again = []
            for items in rounds:
                items = [page(m["table_id"]) if m["type"] == "rows_created" else (m, to) for m, to in items
                         if m["type"] != "table_deleted"]
                again.append(via.publish(items))
                for message, to in items:
                    expected_a.append(message)
                    if (message["type"] == "rows_created" and message["table_id"] == 10) or (to or {}).get("user_ids"):
                        expected_b.append(message)
            await asyncio.gather(*again)
        assert [await on_a.recv() for _ in expected_a] == expected_a
        assert [await on_b.recv() for _ in expected_b] == expected_b
        await _marker(b, on_a, on_b)
        assert a.server.broker.gaps == b.server.broker.gaps == 0
    finally:
        for node in (a, b):
            if node is not None:
                await node.stop()
        redis.kill()
