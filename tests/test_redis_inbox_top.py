"""The mirror of each inbox's last entry (issue 16, item 5b: Redis CPU per publish): the publish
script keeps every inbox's last id and counter ``c`` in the hash ``<prefix>:itops`` (field: the
process id, value ``"<a>-<b> <c>"``) instead of reading the inbox's last entry, which holds up to
about 100 envelopes, on every call. It trusts the mirror only while the inbox is not empty and
has no entry after the mirrored id; otherwise it reads the last entry and writes the mirror again.
Against a real ``redis-server`` and two real ``tornado-rt serve`` processes, a page watched on B,
published through A:

* Steady state: the mirror equals B's inbox's last entry, and a publish reads no inbox entry
  (Redis's own ``INFO commandstats`` count of XREVRANGE moves by the two checks "nothing after
  the mirror", of the control stream and of B's inbox, each ``XREVRANGE + (<mirror> COUNT 1``
  answered empty; a stale mirror costs one more: the last entry read).
* A stale mirror (entries after it, as a publisher of the previous script version leaves it), a
  missing field, a missing hash: no failed append, ``c`` stays +1 per entry, no gap.
* A mirror left behind after the inbox was lost (XLEN 0; B registers again while every envelope
  goes on the control stream): the new inbox starts at ``c`` = 1, not after the old mirror, and
  B counts no gap.

In each: every message reaches B's client once, in order; a marker through the control stream
proves nothing else came. A swept process's mirror is removed with its inbox: see
``test_redis_routing.test_a_killed_process_is_swept_from_redis``.
"""
import asyncio
import time

import pytest
import redis as redis_sync

from redis_fixtures import require_redis_package  # noqa: F401
from test_redis_routing import DIRECTORY, PREFIX
from test_redis_streams import cluster, connect, marker_to_all, metrics, rows_created  # noqa: F401

ITOPS = f"{PREFIX}:itops"


def _xrevranges(raw) -> int:
    return int(raw.info("commandstats").get("cmdstat_xrevrange", {}).get("calls", 0))


def _last(raw, inbox) -> str:
    """The inbox's last entry as the mirror writes it: "<a>-<b> <c>"."""
    (entry_id, fields), = raw.xrevrange(inbox, count=1)
    return f"{entry_id.decode()} {int(fields[b'c'])}"


def _counters(raw, inbox):
    return [int(fields[b"c"]) for _, fields in raw.xrange(inbox)]


async def _publish_and_receive(a, on_b, i):
    await a.publish({"message": rows_created(10, i)})
    got = await on_b.recv()
    assert got["type"] == "rows_created" and got["rows"][0]["id"] == i, str(got)[:300]


async def _no_gap(*nodes):
    for node in nodes:
        exposed = await metrics(node)
        assert exposed["tornado_rt_redis_gaps_total"] == 0, node.name
        assert exposed["tornado_rt_redis_envelopes_lost_total"] == 0, node.name
        assert exposed["tornado_rt_redis_resets_total"] == 0, node.name


def _origin_watching(raw, table_id):
    (origin,) = [o.decode() for o in raw.hkeys(f"{PREFIX}:g:table-{table_id}")]
    return origin


@pytest.mark.gen_test(timeout=60)
async def test_a_stale_or_missing_mirror_of_an_inbox_top_is_not_trusted(connect):  # noqa: F811
    require_redis_package()
    with cluster(connect, 2) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_a, on_b = await connect(a, 1), await connect(b, 2)
        await on_b.subscribe("table", table_id=10)
        raw = redis_sync.Redis.from_url(redis.url, decode_responses=False)
        try:
            b_origin = _origin_watching(raw, 10)
            inbox = f"{PREFIX}:inbox:{b_origin}"
            await _publish_and_receive(a, on_b, 1)
            assert raw.hget(ITOPS, b_origin).decode() == _last(raw, inbox)

            # Steady state: the mirror is read, the inbox's last entry is not (the two XREVRANGEs
            # are the checks that nothing follows the mirrors: the control stream's, B's inbox's).
            before = _xrevranges(raw)
            await _publish_and_receive(a, on_b, 2)
            assert _xrevranges(raw) - before == 2
            stale = raw.hget(ITOPS, b_origin)
            assert stale.decode() == _last(raw, inbox)

            # Stale: an entry after the mirrored id (no control entry in between, so trusting it
            # would append at an id the inbox already has, and repeat its c).
            await _publish_and_receive(a, on_b, 3)
            raw.hset(ITOPS, b_origin, stale)
            before = _xrevranges(raw)
            await _publish_and_receive(a, on_b, 4)
            assert _xrevranges(raw) - before == 3  # not trusted: the last entry was read
            assert raw.hget(ITOPS, b_origin).decode() == _last(raw, inbox)

            # Missing: the field, then the whole hash.
            raw.hdel(ITOPS, b_origin)
            await _publish_and_receive(a, on_b, 5)
            assert raw.hget(ITOPS, b_origin).decode() == _last(raw, inbox)
            raw.delete(ITOPS)
            await _publish_and_receive(a, on_b, 6)
            assert raw.hget(ITOPS, b_origin).decode() == _last(raw, inbox)
            # Several envelopes of one call to B's inbox: one entry, the mirror after it.
            await a.publish([{"message": rows_created(10, 7)}, {"message": rows_created(10, 8)}])
            assert [(await on_b.recv())["rows"][0]["id"] for _ in range(2)] == [7, 8]
            assert raw.hget(ITOPS, b_origin).decode() == _last(raw, inbox)

            assert _counters(raw, inbox) == list(range(1, len(_counters(raw, inbox)) + 1))
            assert len(_counters(raw, inbox)) >= 7
        finally:
            raw.close()
        await marker_to_all(a, on_a, on_b)  # nothing else reached either client
        await _no_gap(a, b)


@pytest.mark.gen_test(timeout=60)
async def test_a_mirror_left_after_its_inbox_was_lost_is_not_trusted(connect):  # noqa: F811
    """B's keys are lost (as when Redis lost its data) but the mirror of its inbox is still there
    (as an older sweep leaves it): B registers again while the recreated routing key keeps every
    envelope on the control stream; its next inbox starts at c = 1, not after the mirror."""
    require_redis_package()
    with cluster(connect, 2, serve_args=["--presence-ttl", "1.5"]) as (redis, (a, b)):
        await a.put_directory(DIRECTORY)
        on_a, on_b = await connect(a, 1), await connect(b, 2)
        await on_b.subscribe("table", table_id=10)
        raw = redis_sync.Redis.from_url(redis.url, decode_responses=False)
        try:
            b_origin = _origin_watching(raw, 10)
            inbox = f"{PREFIX}:inbox:{b_origin}"
            for i in (1, 2, 3):
                await _publish_and_receive(a, on_b, i)
            left = raw.hget(ITOPS, b_origin)
            assert left.decode() == _last(raw, inbox) and left.endswith(b" 3")
            # What a loss of B's keys leaves: no alive key, registrations, inbox nor routing key.
            raw.delete(f"{PREFIX}:alive:{b_origin}", f"{PREFIX}:groups:{b_origin}", inbox,
                       f"{PREFIX}:routing")
            raw.srem(f"{PREFIX}:procs", b_origin)
            raw.srem(f"{PREFIX}:rprocs", b_origin)
            raw.hdel(f"{PREFIX}:g:table-10", b_origin)
            raw.delete(f"{PREFIX}:r:table-10")  # the group's summary key (B was its only process)
            deadline = time.monotonic() + 20
            while True:  # B's next hello registers it again; routing resumes after the grace
                since = raw.get(f"{PREFIX}:routing")
                seconds, micros = raw.time()
                if (raw.hexists(f"{PREFIX}:g:table-10", b_origin) and raw.exists(f"{PREFIX}:alive:{b_origin}")
                        and since is not None and int(since) <= seconds * 1000 + micros // 1000):
                    break
                assert time.monotonic() < deadline, "B did not register again"
                await asyncio.sleep(0.05)  # barrier-ok: bounded poll for B's hello, nothing asserted on time
            raw.hset(ITOPS, b_origin, left)  # the mirror left behind (a sweep may have removed it)
            assert raw.xlen(inbox) == 0

            await _publish_and_receive(a, on_b, 4)
            assert _counters(raw, inbox) == [1]  # started over, not at 4
            assert raw.hget(ITOPS, b_origin).decode() == _last(raw, inbox)
            await _publish_and_receive(a, on_b, 5)
            assert _counters(raw, inbox) == [1, 2]
        finally:
            raw.close()
        await marker_to_all(a, on_a, on_b)
        await _no_gap(a, b)
