"""Page groups partitioned over several Redis instances (issue 16, item 5d; docs/redis.md
"Partitioning over several Redis instances"): the fence gate and the placement as pure logic, then
three real ``redis-server`` processes and real ``tornado-rt serve`` subprocesses with
``--broker url1,url2,url3``.

* The gate: in-order delivery, a shard held behind a fence, fences out of order and duplicated,
  a control envelope held until every shard reached its fence, the timeout decisions (write the
  fence, then give up with a gap), a fence whose control never comes.
* The placement is a stable pure function that spreads the groups.
* Page messages for groups on all three instances reach the other process's subscribers (and
  the publisher's own), per-page order kept, nothing lost; each group's registrations live on its
  instance only.
* Order across instances: a page message on instance x, a control envelope that takes a page
  away, a page message on instance y: the other process's client sees the first, the effect, and
  never the third (a marker comes next). Two processes publishing rounds of page messages and a
  control envelope at the same time: each one's call order holds on both processes.
* A control envelope appended to instance 0 without its fences (a publisher that died before
  writing them): the servers write the fences themselves and apply it; with an instance
  unreachable they give up on its fence: page_discard (a gap, counted and logged), then the
  control envelope.
* URLs listed in another order are refused at start; a bad URL in the list is exit code 2
  naming --broker.
* RedisPublisher / AsyncRedisPublisher with the list keep the same order (their own fences), and
  refuse a list in another order before sending anything.
* The recovery extension's history of a page lives on its group's instance.
* The writer (in process, instances paused with CLIENT PAUSE WRITE): a control envelope reaches
  instance 0 only after the page messages sent before it were answered; page messages for
  instance 0 held behind it keep their order against later ones.

Non-delivery is always proved with a marker that must be the next message received.
"""
import asyncio
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import redis as redis_sync
import ujson

from redis_fixtures import (REPO, RedisProcess, WSClient, marker_message, require_redis_binary,  # noqa: F401
                            serve_command, start_nodes, token)
from tornado_rt.envelope import Envelope
from tornado_rt.redis_partitions import FenceGate, shard_of

PREFIX = "tornado-rt"
K = 3
#: Tables by instance (shard_of("table-<id>", 3)), pinned by test_shard_of_is_stable_and_spreads_groups.
ON = {0: [10, 13, 14], 1: [11, 16, 17], 2: [12, 25, 26]}
DIRECTORY = {"workspaces": {"1": [1, 2, 3]}, "tables": {str(t): 1 for t in range(10, 60)}, "public_views": {}}


# --- pure logic: the placement ---------------------------------------------------------------------

def test_shard_of_is_stable_and_spreads_groups():
    # Every process and publisher must compute the same placement, release after release: pinned.
    assert [shard_of(g, 3) for g in ("table-1", "table-10", "row-10-5", "view-7", "table-123456")] == [1, 0, 0, 0, 2]
    assert [shard_of(g, 4) for g in ("table-1", "table-10", "row-10-5", "view-7", "table-123456")] == [1, 3, 0, 3, 0]
    for k, tables in ON.items():
        assert all(shard_of(f"table-{t}", K) == k for t in tables)
    for k in (2, 3, 5, 8):
        counts = [0] * k
        for t in range(20_000):
            counts[shard_of(f"table-{t}", k)] += 1
        assert min(counts) > 0.9 * 20_000 / k and max(counts) < 1.1 * 20_000 / k, (k, counts)


def test_the_broker_setting_takes_a_list_of_redis_urls():
    from tornado_rt.settings import _broker

    assert _broker("redis://a:1/0") == "redis://a:1/0"  # one: as before
    assert _broker(" redis://a:1/0 , rediss://b:2/1,unix:///tmp/r.sock ") == "redis://a:1/0,rediss://b:2/1,unix:///tmp/r.sock"
    assert _broker(["redis://a:1/0", "redis://b:1/0"]) == "redis://a:1/0,redis://b:1/0"  # a list in the config file
    for bad, why in (("redis://a:1/0,", "empty Redis URL"), ("redis://a:1/0,amqp://b/", "Redis URL"),
                     ("redis://a:1/0,redis://a:1/0", "listed twice"), ("redis://:secret@a:1/0,redis://b:x/0", "not a valid URL")):
        with pytest.raises(ValueError, match=why) as refused:
            _broker(bad)
        assert "secret" not in str(refused.value)


# --- pure logic: the gate --------------------------------------------------------------------------

class _Future:
    def __init__(self):
        self.result = None

    def done(self):
        return self.result is not None

    def set_result(self, value):
        assert self.result is None
        self.result = "done"


class _Publish:
    """What RedisBroker._hand passes for a held envelope of this process (a _Pending)."""

    def __init__(self, deadline=0.0):
        self.future = _Future()
        self.deadline = deadline


def page(name):
    return Envelope("message", type="rows_created", data=name, audience=["page", name])


def control(name):
    return Envelope("revoke", user_ids=[1], permission_group=name)


def names(out):
    return [env.data or env.permission_group for env in out]


def test_gate_holds_a_shard_behind_its_fence_and_a_control_until_every_shard_reached_it():
    out = []
    gate = FenceGate(3, out.append)
    gate.open(10)
    assert gate.page(0, page("a0"), 10) is None and gate.page(1, page("a1")) is None
    held_control = gate.control(control("C11"), 11)
    assert held_control is not None  # no shard reached fence 11 yet
    mine = _Publish()
    held_control(mine)  # this process's own control: completed when applied
    assert gate.page(0, page("b0"), 11) is not None  # after the control on shard 0: behind it
    gate.fence(1, 11)
    assert gate.page(1, page("b1")) is not None  # after fence 11 on shard 1: waits for control 11
    assert gate.page(2, page("a2")) is None  # before shard 2's fence: goes on
    assert names(out) == ["a0", "a1", "a2"] and not mine.future.done()
    gate.fence(2, 11)  # every shard reached 11: control 11, then what waited behind it
    assert names(out) == ["a0", "a1", "a2", "C11", "b0", "b1"]
    assert mine.future.done() and gate.applied == 11 and not gate.holding() and gate.waited == 1
    assert gate.page(1, page("c1")) is None and gate.page(2, page("c2")) is None


def test_gate_takes_fences_out_of_order_and_duplicated():
    out = []
    gate = FenceGate(3, out.append)
    gate.open(10)
    gate.fence(1, 12)  # shard 1 is ahead: holds its later envelopes until control 12
    assert gate.page(1, page("x1")) is not None
    gate.fence(2, 11)
    assert gate.control(control("C11"), 11) is None  # every shard reached 11 (shard 1 even 12)
    assert gate.control(control("C12"), 12) is not None  # shard 2 is at 11
    gate.fence(2, 12)
    assert names(out) == ["C11", "C12", "x1"] and gate.applied == 12 and not gate.holding()
    gate.fence(1, 11)  # late and duplicated: no-ops
    gate.fence(1, 12)
    gate.fence(2, 12)
    assert gate.page(1, page("y1")) is None and gate.page(2, page("y2")) is None
    assert names(out)[-2:] == ["y1", "y2"] and not gate.holding()
    # A control that waits behind another one: both held, then applied in order.
    assert gate.control(control("C13"), 13) is not None and gate.control(control("C14"), 14) is not None
    gate.fence(1, 14)
    gate.fence(2, 13)
    assert names(out)[-1] == "C13"
    gate.fence(2, 14)
    assert names(out)[-1] == "C14" and gate.applied == 14


def test_gate_goes_on_after_a_control_shard_zero_read_but_never_handed_on():
    """A control entry that delivered nothing (a duplicate id, a malformed entry): the next one
    (or advance()) tells the gate shard 0 read past it, so shards held at its fence go on."""
    out = []
    gate = FenceGate(3, out.append)
    gate.open(10)
    gate.fence(1, 11)
    gate.fence(2, 11)
    assert gate.page(1, page("p1")) is not None  # control 11 not seen: shard 1 waits
    gate.fence(1, 12)
    gate.fence(2, 12)
    assert gate.control(control("C12"), 12) is None  # shard 0 read 11 before 12: both shards go on
    assert names(out) == ["p1", "C12"] and not gate.holding()
    gate.fence(1, 13)
    assert gate.page(1, page("p2")) is not None
    gate.advance(13)  # shard 0 read 13 (it delivered nothing): shard 1 goes on
    assert names(out)[-1] == "p2" and not gate.holding()


def test_a_closed_gate_passes_everything_and_records_fences():
    out = []
    gate = FenceGate(2, out.append)
    gate.fence(1, 50)
    assert gate.control(control("C40"), 40) is None and gate.control(control("C60"), 60) is None
    assert gate.page(1, page("p")) is None and names(out) == ["C40", "C60", "p"] and gate.reached[1] == 50
    gate.open(60)
    assert gate.applied == 60 and gate.control(control("C61"), 61) is not None


def test_gate_timeouts_write_the_missing_fence_then_give_up_with_a_gap():
    out = []
    gate = FenceGate(3, out.append)
    gate.open(10)
    waiter = _Publish(deadline=1.0)
    gate.control(control("C11"), 11)(waiter)
    assert gate.overdue(100.0, 3.0, 6.0) == ([], [])  # the wait starts when first seen
    assert gate.overdue(102.9, 3.0, 6.0) == ([], [])
    assert gate.waiters() == [waiter]  # the caller completes it at its deadline (accepted)
    writes, gaps = gate.overdue(103.0, 3.0, 6.0)
    assert sorted(writes) == [(1, 11), (2, 11)] and gaps == [] and gate.timeouts == 2
    assert gate.overdue(104.0, 3.0, 6.0) == ([], [])  # asked once
    gate.fence(1, 11)  # shard 1's came (written by whoever); shard 2 is still missing
    assert out == []
    # Shard 2's reader is connected (merely behind): the fence written for it will come, no gap.
    assert gate.overdue(106.0, 3.0, 6.0, stuck=lambda shard: False) == ([], [])
    assert names(out) == [] and gate.gaps == 0
    writes, gaps = gate.overdue(106.0, 3.0, 6.0, stuck=lambda shard: shard == 2)  # shard 2 unreachable
    assert writes == [] and gaps == [(2, 11)] and gate.gaps == 1
    assert out == []  # the caller tells the clients first (page_discard), then resumes
    gate.resume()
    assert names(out) == ["C11"] and waiter.future.done() and not gate.holding()
    gate.fence(2, 11)  # arrives after all: a no-op
    assert gate.page(2, page("late")) is None and names(out)[-1] == "late"
    # A fence whose control never comes (instance 0 restarted empty): shard 1 is released with
    # a gap; a waiting control of shard 0 would have decided instead.
    gate.fence(1, 30)
    assert gate.page(1, page("q1")) is not None
    assert gate.overdue(200.0, 3.0, 6.0) == ([], [])
    assert gate.overdue(205.9, 3.0, 6.0) == ([], [])
    assert gate.overdue(206.0, 3.0, 6.0, stuck=lambda shard: shard != 0) == ([], [])  # shard 0 behind: it may come
    assert gate.overdue(206.0, 3.0, 6.0, stuck=lambda shard: shard == 0) == ([], [(1, 30)])
    gate.resume()
    assert names(out)[-1] == "q1" and gate.gaps == 2 and not gate.holding()


# --- three Redis instances, real processes ---------------------------------------------------------

@contextmanager
def partitioned(connect, count=2, serve_args=()):
    """Three fresh redis-servers and ``count`` tornado-rt serve processes partitioned over them."""
    binary = require_redis_binary()
    instances = []
    try:
        instances = [RedisProcess(binary).start() for _ in range(K)]
        nodes = start_nodes(",".join(r.url for r in instances), count, serve_args)
    except BaseException:
        for r in instances:
            r.kill()
        raise
    try:
        yield instances, nodes
    finally:
        for client in connect.clients:
            client.close()
        for node in nodes:
            node.stop()
        for r in instances:
            r.kill()


@pytest.fixture
def connect(io_loop):
    from tornado.websocket import websocket_connect

    clients = []

    async def _connect(node, user_id):
        client = WSClient(await websocket_connect(f"{node.ws_url}?jwt_token={token(user_id)}"), node)
        clients.append(client)
        auth = await client.recv()
        assert auth["type"] == "authentication" and auth["success"] is True, auth
        return client

    _connect.clients = clients
    yield _connect


def rows_created(table_id, i):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": i}], "metadata": {}, "before_row_id": None}


async def stats(node):
    status, body = await node.call("GET", "/api/stats")
    assert status == 200, status
    return body["redis"]


async def metrics(node):
    from prometheus_client.parser import text_string_to_metric_families

    status, body = await node.call("GET", "/metrics")
    assert status == 200, status
    text = body.decode() if isinstance(body, bytes) else str(body)
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


async def marker_to_all(via, *clients):
    marker = marker_message()
    await via.publish({"message": marker, "to": {"all_users": True}})
    for client in clients:
        got = await client.recv()
        assert got == marker, f"{client.node.name}: expected nothing before the marker, got {str(got)[:300]}"


@pytest.mark.gen_test(timeout=60)
async def test_page_messages_on_every_instance_reach_the_other_process_in_order(connect):
    with partitioned(connect) as (instances, (a, b)):
        await a.put_directory(DIRECTORY)
        tables = [t for k in range(K) for t in ON[k][:2]]
        on_b = await connect(b, 1)
        on_a = await connect(a, 2)  # the publisher's own subscriber: its references, through the gate
        for t in tables:
            await on_b.subscribe("table", table_id=t)
        for k in range(K):
            await on_a.subscribe("table", table_id=ON[k][0])
        total = 600
        for start in range(0, total, 100):
            await a.publish([{"message": rows_created(tables[i % len(tables)], i)} for i in range(start, start + 100)])
        got_b = {t: [] for t in tables}
        for _ in range(total):
            message = await on_b.recv()
            got_b[message["table_id"]].append(message["rows"][0]["id"])
        for n, t in enumerate(tables):
            assert got_b[t] == list(range(n, total, len(tables))), t
        got_a = {ON[k][0]: [] for k in range(K)}
        for _ in range(total // 2):
            message = await on_a.recv()
            got_a[message["table_id"]].append(message["rows"][0]["id"])
        for t, ids in got_a.items():
            assert ids == list(range(tables.index(t), total, len(tables))), t
        await marker_to_all(a, on_a, on_b)  # nothing else came
        # Each group is registered on its instance only.
        for k, r in enumerate(instances):
            raw = redis_sync.Redis.from_url(r.url)
            try:
                for t in tables:
                    registered = raw.hkeys(f"{PREFIX}:g:table-{t}")
                    assert bool(registered) == (shard_of(f"table-{t}", K) == k), (t, k, registered)
                assert raw.get(f"{PREFIX}:partition") == f"{k}/{K}".encode()
            finally:
                raw.close()
        seen_a, seen_b = await stats(a), await stats(b)
        assert seen_b["inbox_envelopes"] == total and seen_b["dropped"] == 0 and seen_b["partitions"] == K, seen_b
        assert seen_a["fences_sent"] >= 2 * (K - 1) and seen_a["fence_gaps"] == 0, seen_a  # directory, marker
        exposed = await metrics(a)
        assert exposed["tornado_rt_redis_partitions"] == K
        assert exposed["tornado_rt_redis_fences_sent_total"] == seen_a["fences_sent"]
        assert exposed["tornado_rt_redis_fence_gaps_total"] == 0 and exposed["tornado_rt_redis_gaps_total"] == 0
        status, health = await b.call("GET", "/healthz")
        assert status == 200 and health["broker"] == {"kind": "redis", "connected": True}, health


@pytest.mark.gen_test(timeout=60)
async def test_a_control_envelope_keeps_its_place_among_page_messages_on_other_instances(connect):
    """p1 on instance x, a control envelope taking page p2's table away, p2's message on instance
    y != x: B's client sees p1, the effect, never p2 — in one HTTP batch (handed over at once: the
    third is held until the control's fences are queued) and in three requests."""
    with partitioned(connect) as (instances, (a, b)):
        await a.put_directory(DIRECTORY)
        on_b = await connect(b, 1)
        for x, y in ((ON[1][0], ON[2][0]), (ON[2][1], ON[0][1]), (ON[0][2], ON[1][2])):
            assert shard_of(f"table-{x}", K) != shard_of(f"table-{y}", K)
            await on_b.subscribe("table", table_id=x)
            await on_b.subscribe("table", table_id=y)
            first = rows_created(x, 1)
            deleted = {"type": "table_deleted", "database_id": 1, "table_id": y}  # a side effect: control
            after = rows_created(y, 2)
            await a.publish([{"message": first}, {"message": deleted, "to": {"page": "table", "table_id": y}},
                             {"message": after}])
            assert await on_b.recv() == first
            assert await on_b.recv() == deleted
            assert await on_b.recv() == {"type": "page_discard", "page": "table", "parameters": {"table_id": y}}
            await marker_to_all(a, on_b)  # `after` never came
        # Three requests, the control a revocation through the HTTP API.
        x, y = ON[1][1], ON[2][2]
        await on_b.subscribe("table", table_id=x)
        await on_b.subscribe("table", table_id=y)
        first, after = rows_created(x, 3), rows_created(y, 4)
        await a.publish({"message": first})
        status, body = await a.call("POST", "/api/revoke", {"user_ids": [1], "permission_group": f"permissions-table-{y}"})
        assert status == 200, body
        await a.publish({"message": after})
        assert await on_b.recv() == first
        assert await on_b.recv() == {"type": "page_discard", "page": "table", "parameters": {"table_id": y}}
        await marker_to_all(a, on_b)
        seen = await stats(b)
        assert seen["fence_gaps"] == 0 and seen["fence_timeouts"] == 0, seen


@pytest.mark.gen_test(timeout=60)
async def test_a_control_envelope_without_fences_is_fenced_by_the_servers(connect):
    """A control envelope appended to instance 0 alone (what a publisher that died before writing
    its fences leaves): the servers wait fence_timeout, write the fences themselves, apply it."""
    from tornado_rt.redis_broker import AsyncRedisPublisher

    with partitioned(connect) as (instances, (a, b)):
        await a.put_directory(DIRECTORY)
        on_b = await connect(b, 1)
        on_a = await connect(a, 2)
        await on_b.subscribe("table", table_id=ON[1][0])
        marker = marker_message()
        async with AsyncRedisPublisher(instances[0].url) as alone:  # one URL: instance 0 only, no fence
            await alone.publish(marker, {"all_users": True})
        assert await on_b.recv() == marker
        assert await on_a.recv() == marker
        after = rows_created(ON[1][0], 1)
        await b.publish({"message": after})
        assert await on_b.recv() == after
        await marker_to_all(b, on_a, on_b)
        seen_a, seen_b = await stats(a), await stats(b)
        assert seen_a["fences_waited"] >= 1 and seen_b["fences_waited"] >= 1, (seen_a, seen_b)
        assert seen_a["fence_timeouts"] + seen_b["fence_timeouts"] >= 1, (seen_a, seen_b)
        assert seen_a["fence_gaps"] == seen_b["fence_gaps"] == 0
        # The fences the servers wrote are on instances 1 and 2.
        for r in instances[1:]:
            raw = redis_sync.Redis.from_url(r.url)
            try:
                kinds = [ujson.loads(fields[b"e"].split(b"\n")[0])["k"] for _, fields in raw.xrange(f"{PREFIX}:stream")]
            finally:
                raw.close()
            assert "fence" in kinds, kinds


def _serve(broker, timeout=30):
    return subprocess.run(serve_command(broker), cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.gen_test(timeout=60)
async def test_urls_in_another_order_or_a_bad_url_are_refused_at_start(connect):
    with partitioned(connect, count=1) as (instances, (a,)):
        urls = [r.url for r in instances]
        result = _serve(",".join([urls[1], urls[0], urls[2]]))
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "--broker" in lines[0], result.stderr
        assert f"{urls[1]} is partition 1/3 but listed as 0/3" in lines[0], lines[0]
        assert "same Redis URLs in the same order" in lines[0]
        result = _serve(",".join(urls[:2]))  # another K
        assert result.returncode == 2 and "is partition 0/3 but listed as 0/2" in result.stderr, result
        on_a = await connect(a, 1)
        await marker_to_all(a, on_a)  # the running process is untouched
    for broker, why in ((f"{urls[0]},http://127.0.0.1:1/", "Redis URL"), (f"{urls[0]},,{urls[1]}", "empty Redis URL"),
                        (f"{urls[0]},{urls[0]}", "listed twice"), (f"{urls[0]},redis://127.0.0.1:http/0", "not a valid URL")):
        result = _serve(broker)
        assert result.returncode == 2, (broker, result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "--broker" in lines[0] and why in lines[0], (broker, result.stderr)


@pytest.mark.gen_test(timeout=60)
async def test_publishers_outside_a_server_fence_their_control_envelopes(connect):
    """RedisPublisher / AsyncRedisPublisher with the list of URLs: each page message on its
    group's instance, a control envelope on instance 0 followed by its fences, in call order; in
    another order the list is refused before anything is sent."""
    from tornado_rt.redis_broker import AsyncRedisPublisher, RedisPublisher
    from tornado_rt.redis_partitions import PartitionMismatch

    with partitioned(connect) as (instances, (a, b)):
        await a.put_directory(DIRECTORY)
        on_b = await connect(b, 1)
        urls = [r.url for r in instances]
        rounds = ((ON[1][0], ON[2][0]), (ON[0][1], ON[1][1]))
        for n, (x, y) in enumerate(rounds):
            await on_b.subscribe("table", table_id=x)
            await on_b.subscribe("table", table_id=y)
            first, after = rows_created(x, 1), rows_created(y, 2)
            deleted = {"type": "table_deleted", "database_id": 1, "table_id": y}
            items = [{"message": first}, {"message": deleted, "to": {"page": "table", "table_id": y}},
                     {"message": after}]
            if n == 0:
                with RedisPublisher(",".join(urls)) as publisher:
                    publisher.publish_many(items)
            else:
                async with AsyncRedisPublisher(urls) as publisher:
                    await publisher.publish_many(items)
            assert await on_b.recv() == first
            assert await on_b.recv() == deleted
            assert await on_b.recv() == {"type": "page_discard", "page": "table", "parameters": {"table_id": y}}
            await marker_to_all(a, on_b)  # `after` never came
        seen = await stats(b)
        assert seen["fence_timeouts"] == 0 and seen["fence_gaps"] == 0, seen  # the publishers wrote the fences
        with RedisPublisher([urls[0], urls[2], urls[1]]) as wrong:
            with pytest.raises(PartitionMismatch, match="is partition 2/3 but listed as 1/3"):
                wrong.publish(marker_message(), {"all_users": True})
        async with AsyncRedisPublisher([urls[0], urls[2], urls[1]]) as wrong_async:
            with pytest.raises(PartitionMismatch, match="same Redis URLs in the same order"):
                await wrong_async.publish(marker_message(), {"all_users": True})
        await marker_to_all(a, on_b)  # nothing was sent


@pytest.mark.gen_test(timeout=60)
async def test_recovery_history_lives_on_the_groups_instance(connect):
    """With --history-size: a page's positions and history are kept on its group's instance; a
    client that subscribed through A recovers through B, for a page on each instance."""
    with partitioned(connect, serve_args=["--history-size", "5"]) as (instances, (a, b)):
        await a.put_directory(DIRECTORY)
        from tornado.websocket import websocket_connect

        async def positioned(node):
            client = WSClient(await websocket_connect(f"{node.ws_url}?jwt_token={token(1)}&positions=1"), node)
            connect.clients.append(client)
            assert (await client.recv())["success"] is True
            return client

        async def subscribe(client, table, since=None):
            await client.send({"page": "table", "table_id": table, **({"since": since} if since else {})})
            reply = await client.recv()
            assert reply["type"] == "page_add", reply
            return reply

        for k in range(K):
            table = ON[k][0]
            first = await positioned(a)
            added = await subscribe(first, table)
            epoch, start = added["position"]["epoch"], added["position"]["offset"]
            await b.publish({"message": rows_created(table, 1)})
            assert await first.recv() == {**rows_created(table, 1), "position": {"epoch": epoch, "offset": start + 1}}
            first.close()
            for n in (2, 3):
                await a.publish({"message": rows_created(table, n)})
            again = await positioned(b)
            assert (await subscribe(again, table, {"epoch": epoch, "offset": start + 1}))["recovered"] is True
            for n in (2, 3):
                assert await again.recv() == {**rows_created(table, n), "position": {"epoch": epoch, "offset": start + n}}
            raw = redis_sync.Redis.from_url(instances[k].url)
            try:
                assert raw.xlen(f"{PREFIX}:hist:table-{table}") == 3  # on its instance
            finally:
                raw.close()
            for other in range(K):
                if other != k:
                    raw = redis_sync.Redis.from_url(instances[other].url)
                    try:
                        assert not raw.exists(f"{PREFIX}:hist:table-{table}", f"{PREFIX}:pos:table-{table}")
                    finally:
                        raw.close()
            await marker_to_all(a, again)


@pytest.mark.gen_test(timeout=60)
async def test_a_control_envelope_goes_to_instance_0_only_once_the_page_messages_before_it_were_answered():
    """Why the writer waits: a page message sent before a control envelope must be in its
    instance's stream before the control envelope is accepted, else another publisher's later
    fence could land on that instance before it (and let readers apply the control first).
    Instance 1 pauses its writes (CLIENT PAUSE WRITE) with the page message in flight; another
    publisher's control envelope reaches instance 0 meanwhile; when instance 1 resumes, the
    control envelope of the batch is appended after it, not before."""
    from tornado_rt import RealtimeServer, Settings
    from tornado_rt.envelope import message_envelope
    from tornado_rt.redis_broker import AsyncRedisPublisher
    from tornado_rt.redis_partitions import PartitionedRedisBroker

    binary = require_redis_binary()
    instances = [RedisProcess(binary).start() for _ in range(K)]
    raws = [redis_sync.Redis.from_url(r.url) for r in instances]
    server = RealtimeServer(Settings(jwt_secret="partition-tests-secret-long-enough-for-hs256", ping_interval=0),
                            load_entry_points=False, broker=PartitionedRedisBroker([r.url for r in instances]))
    try:
        await server.start()
        broker = server.broker
        page_message = message_envelope(server.registry, rows_created(ON[1][0], 1))
        mine, theirs = marker_message(), marker_message()
        raws[1].execute_command("CLIENT", "PAUSE", 5000, "WRITE")
        done = broker.publish_batch([page_message, message_envelope(server.registry, mine, {"all_users": True})])
        first = broker.shards[0]
        deadline = time.monotonic() + 10
        while first._outbox or not all(entry.accepted for entry in first._pending.values()):
            assert time.monotonic() < deadline, "instance 0's writer never went idle"
            await asyncio.sleep(0.01)  # barrier-ok: bounded poll until instance 0 answered what it was sent
        async with AsyncRedisPublisher(instances[0].url) as other:
            await other.publish(theirs, {"all_users": True})
        raws[1].execute_command("CLIENT", "UNPAUSE")
        await done
        order = [ujson.loads(fields[b"e"].split(b"\n", 1)[1]) for _, fields in raws[0].xrange(f"{PREFIX}:stream")
                 if b"\n" in fields[b"e"]]
        markers = [m for m in order if m.get("type") == "notifications_fetch_required"]
        assert markers == [theirs, mine], markers
    finally:
        raws[1].execute_command("CLIENT", "UNPAUSE")
        await server.shutdown(timeout=1)
        for raw in raws:
            raw.close()
        for r in instances:
            r.kill()


@pytest.mark.gen_test(timeout=60)
async def test_page_messages_for_instance_0_held_behind_a_control_envelope_keep_their_order():
    """A control envelope waits for a probe (a page message for instance 1 is unanswered: its
    writes are paused); page messages for instance 1 and then instance 0 come after it and are
    held. Once the control envelope is handed to instance 0 (whose writes are paused in turn), a
    new page message for instance 0 must not overtake the held one for the same page."""
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port
    from tornado.websocket import websocket_connect

    from tornado_rt import RealtimeServer, Settings
    from tornado_rt.envelope import message_envelope
    from tornado_rt.redis_partitions import PartitionedRedisBroker

    binary = require_redis_binary()
    instances = [RedisProcess(binary).start() for _ in range(K)]
    raws = [redis_sync.Redis.from_url(r.url) for r in instances]
    secret = "redis-tests-secret-that-is-long-enough-for-hs256"
    server = RealtimeServer(Settings(jwt_secret=secret, ping_interval=0), load_entry_points=False,
                            broker=PartitionedRedisBroker([r.url for r in instances]))
    server.directory.load(DIRECTORY)
    sock, port = bind_unused_port()
    http = HTTPServer(server.make_app())
    http.add_sockets([sock])
    client = None
    try:
        await server.start()
        broker = server.broker
        client = WSClient(await websocket_connect(f"ws://127.0.0.1:{port}/ws/core/?jwt_token={token(1)}"), None)
        assert (await client.recv())["success"] is True
        on_0, on_1 = ON[0][0], ON[1][0]
        await client.subscribe("table", table_id=on_0)
        await client.subscribe("table", table_id=on_1)

        def publish(message, to=None):
            return broker.publish(message_envelope(server.registry, message, to))

        async def until(condition, what):
            deadline = time.monotonic() + 10
            while not condition():
                assert time.monotonic() < deadline, what
                await asyncio.sleep(0.01)  # barrier-ok: bounded poll of the writer's state

        raws[1].execute_command("CLIENT", "PAUSE", 5000, "WRITE")
        futures = [publish(rows_created(on_1, 1))]  # in flight on instance 1
        mine = marker_message()
        futures.append(publish(mine, {"all_users": True}))  # waits for a probe of instance 1
        futures.append(publish(rows_created(on_1, 2)))  # held: after the control envelope
        futures.append(publish(rows_created(on_0, 3)))  # held: the control envelope is not on instance 0 yet
        raws[0].execute_command("CLIENT", "PAUSE", 5000, "WRITE")
        raws[1].execute_command("CLIENT", "UNPAUSE")
        await until(lambda: broker._unhanded == 0, "the control envelope was never handed to instance 0")
        futures.append(publish(rows_created(on_0, 4)))  # must come after 3
        raws[0].execute_command("CLIENT", "UNPAUSE")
        for future in futures:
            await future
        got = [await client.recv() for _ in range(5)]
        # The control envelope after the first, before the rest; each page in publish order (the
        # two pages on different instances may interleave either way).
        assert got[:2] == [rows_created(on_1, 1), mine], got
        assert [m for m in got[2:] if m["table_id"] == on_0] == [rows_created(on_0, 3), rows_created(on_0, 4)], got
        assert [m for m in got[2:] if m["table_id"] == on_1] == [rows_created(on_1, 2)], got
    finally:
        for raw in raws:
            raw.execute_command("CLIENT", "UNPAUSE")
            raw.close()
        if client is not None:
            client.close()
        http.stop()
        await server.shutdown(timeout=1)
        for r in instances:
            r.kill()


@pytest.mark.gen_test(timeout=60)
async def test_a_fence_from_an_unreachable_instance_is_given_up_on_with_a_gap(connect):
    """Instance 2 is killed; a control envelope reaches instance 0 without fences (a publisher
    of instance 0 alone). Instance 1's fence is written by the servers; instance 2's cannot be:
    after twice fence_timeout the servers apply the control envelope anyway, and since order
    with instance 2's page messages may not hold, their clients get page_discard (a gap, counted
    and logged)."""
    from tornado_rt.redis_broker import AsyncRedisPublisher

    with partitioned(connect) as (instances, (a, b)):
        await a.put_directory(DIRECTORY)
        on_b = await connect(b, 1)
        await on_b.subscribe("table", table_id=ON[1][0])
        instances[2].kill()
        marker = marker_message()
        async with AsyncRedisPublisher(instances[0].url) as alone:
            await alone.publish(marker, {"all_users": True})
        assert await on_b.recv() == {"type": "page_discard", "page": "table", "parameters": {"table_id": ON[1][0]}}
        assert await on_b.recv() == marker  # after the gap's page_discard
        seen = await stats(b)
        assert seen["fence_gaps"] == 1 and seen["fences_waited"] >= 1, seen
        assert "was given up on" in b.log_text() and "fence gap 1" in b.log_text()
        status, health = await b.call("GET", "/healthz")
        assert status == 503 and health["broker"] == {"kind": "redis", "connected": False}, health


@pytest.mark.gen_test(timeout=90)
async def test_two_publishers_interleaving_control_envelopes_keep_each_ones_call_order(connect):
    """A and B publish at the same time, each in rounds: page messages spread over the three
    instances, then a control envelope (to every user), awaited in turn. A client on each process,
    on every page, sees each publisher's rounds in its call order: every page message of round k
    after control k - 1 and before control k — while the other publisher's control envelopes (and
    fences) interleave."""
    with partitioned(connect) as (instances, (a, b)):
        await a.put_directory(DIRECTORY)
        tables = [t for k in range(K) for t in ON[k]]
        clients = []
        for node in (a, b):
            client = await connect(node, 1)
            for t in tables:
                await client.subscribe("table", table_id=t)
            clients.append(client)
        rounds = 40

        async def publisher(node, name):
            for k in range(rounds):
                pages = [{"message": {**rows_created(tables[(k * 7 + j) % len(tables)], f"{name}-{k}-{j}")}}
                         for j in range(1 + (k * 5) % 9)]
                control = {"message": {"type": "notifications_fetch_required", "c": f"{name}-{k}"},
                           "to": {"all_users": True}}
                if k % 2:
                    await node.publish(pages + [control])  # one batch
                else:
                    for item in pages + [control]:  # one request each, in turn
                        await node.publish(item)

        await asyncio.gather(publisher(a, "A"), publisher(b, "B"))
        end = marker_message()
        await a.publish({"message": end, "to": {"all_users": True}})
        for client in clients:
            seen = []
            while (message := await client.recv()) != end:
                seen.append(message)
            for name in "AB":
                controls = -1
                for message in seen:
                    if message["type"] == "rows_created" and message["rows"][0]["id"].startswith(name):
                        assert int(message["rows"][0]["id"].split("-")[1]) == controls + 1, (client.node.name, message)
                    elif message.get("c", "").startswith(name):
                        assert int(message["c"].split("-")[1]) == controls + 1, (client.node.name, message)
                        controls += 1
                assert controls == rounds - 1
            total = sum(1 + (k * 5) % 9 for k in range(rounds))
            assert len([m for m in seen if m["type"] == "rows_created"]) == 2 * total  # nothing lost
        for node in (a, b):
            seen = await stats(node)
            assert seen["fence_gaps"] == 0 and seen["fence_timeouts"] == 0, seen
