"""The Redis broker over one Redis Stream (issue 10, items 7 and 8), against a real ``redis-server``
and real ``tornado-rt serve`` subprocesses.

* A process stalled (SIGSTOP) while far more than Redis's pub/sub output buffer passes through
  another delivers every acknowledged message, in order, once it runs again. The test's Redis has
  a tiny ``client-output-buffer-limit pubsub``: with the old pub/sub broker Redis dropped the
  stalled subscriber and its clients silently missed messages answered 200.
* A process that falls behind further than the stream keeps has a gap: its clients get
  ``page_discard`` for every page, the gap is counted in /metrics; the other process is untouched.
* A stream that starts over (FLUSHALL) while a process is behind is a gap there too; a process
  that had read everything only counts a reset.
* With Redis stalled (SIGSTOP), a publish answered 503 is never delivered later, and a retry with
  the same id (through another process, even twice) is delivered exactly once.

Non-delivery is always proved with a marker that must be the next message received.
"""
import asyncio
import signal
from contextlib import contextmanager

import pytest
import ujson
from prometheus_client.parser import text_string_to_metric_families
from tornado.websocket import websocket_connect

from redis_fixtures import (RedisProcess, WSClient, marker_message, require_redis_binary, start_nodes,
                            token)

DIRECTORY = {"workspaces": {"1": [1, 2, 3]}, "tables": {"10": 1, "11": 1}, "public_views": {}}


def rows_created(table_id, i, text=""):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": i, "text": text}], "metadata": {},
            "before_row_id": None}


@contextmanager
def cluster(connect, count=2, redis_args=(), serve_args=()):
    """A fresh redis-server and ``count`` tornado-rt serve processes on it. At the end the
    clients made by ``connect`` are closed first (so that the processes stop at once)."""
    redis = RedisProcess(require_redis_binary(), args=redis_args).start()
    try:
        nodes = start_nodes(redis.url, count, serve_args)
    except BaseException:
        redis.kill()
        raise
    try:
        yield redis, nodes
    finally:
        for client in connect.clients:
            client.close()
        for node in nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)
            node.stop()
        if redis.proc is not None and redis.proc.poll() is None:
            redis.proc.send_signal(signal.SIGCONT)
        redis.kill()


@contextmanager
def stopped(proc):
    """SIGSTOP ``proc`` for the block (SIGCONT after it, whatever happens)."""
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


@pytest.fixture
def connect(io_loop):
    clients = []

    async def _connect(node, user_id):
        client = WSClient(await websocket_connect(f"{node.ws_url}?jwt_token={token(user_id)}",
                                                  max_message_size=64 * 1024 * 1024), node)
        clients.append(client)
        auth = await client.recv()
        assert auth["type"] == "authentication" and auth["success"] is True, auth
        client.web_socket_id = auth["web_socket_id"]
        return client

    _connect.clients = clients
    yield _connect
    for client in clients:
        client.close()


async def marker_to_all(via, *clients):
    """A marker to every connection through ``via``: it must be the next message of each client."""
    marker = marker_message()
    await via.publish({"message": marker, "to": {"all_users": True}})
    for client in clients:
        got = await client.recv()
        assert got == marker, f"{client.node.name}: expected nothing before the marker, got {str(got)[:300]}"


async def metrics(node):
    status, body = await node.call("GET", "/metrics")
    assert status == 200, status
    text = body.decode() if isinstance(body, bytes) else str(body)
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples}


async def publish_until_accepted(node, attempts=400):
    """Retry a publish (to a user nobody is connected as) until the process accepts it again.
    Bounded (about 20 s)."""
    for _ in range(attempts):
        status, body = await node.call("POST", "/api/publish",
                                       {"message": marker_message(), "to": {"user_ids": [999999]}})
        if status == 200:
            return
        assert status == 503, (status, body)
        await asyncio.sleep(0.05)  # barrier-ok: retry interval of a bounded poll, nothing asserted on time
    raise AssertionError(f"{node.name} did not accept publishes again after Redis came back")


# --- item 7: a stalled process loses nothing ----------------------------------------------------------

@pytest.mark.gen_test(timeout=90)
async def test_a_stalled_process_delivers_every_acknowledged_message_in_order(connect):
    """8 MiB pass through A while B is stopped; Redis's pub/sub buffer for a subscriber is set to
    64 KiB (hard). Every message answered 200 reaches B's client, in order, after SIGCONT."""
    with cluster(connect, 2, redis_args=["--client-output-buffer-limit", "pubsub 64kb 32kb 1"]) as (redis, (a, b)):
        for node in (a, b):
            await node.put_directory(DIRECTORY)
        on_a = await connect(a, 1)
        on_b = await connect(b, 2)
        await on_a.subscribe("table", table_id=10)
        await on_b.subscribe("table", table_id=10)
        text = "x" * 16 * 1024
        total = 512
        with stopped(b.proc):
            for start in range(0, total, 32):
                await a.publish([{"message": rows_created(10, i, text)} for i in range(start, start + 32)])
                # A delivers them meanwhile (it publishes and reads; B does not read at all).
                for i in range(start, start + 32):
                    assert (await on_a.recv())["rows"][0]["id"] == i
        marker = marker_message()  # everything answered 200 before it is ahead of it on B too

        async def until_marker(client):
            got_ids = []
            while (got := await client.recv()) != marker:
                assert got["type"] == "rows_created", str(got)[:300]
                got_ids.append(got["rows"][0]["id"])
            return got_ids

        reading = asyncio.ensure_future(until_marker(on_b))  # B's client reads all along
        await publish_until_accepted(b)  # B reads again (with pub/sub of old: it subscribed again)
        await a.publish({"message": marker, "to": {"all_users": True}})
        assert await on_a.recv() == marker
        received = await reading
        assert len(received) == total and received == list(range(total)), (
            f"B's client got {len(received)} of {total} acknowledged messages")
        assert (await metrics(b))["tornado_rt_redis_gaps_total"] == 0


# --- gaps ---------------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_a_process_behind_the_trimmed_stream_sends_page_discard_and_counts_the_gap(connect):
    with cluster(connect, 2, serve_args=["--redis-stream-length", "50"]) as (redis, (a, b)):
        for node in (a, b):
            await node.put_directory(DIRECTORY)
        on_a = await connect(a, 1)
        on_b = await connect(b, 2)
        await on_a.subscribe("table", table_id=10)
        await on_b.subscribe("table", table_id=10)
        await on_b.subscribe("row", table_id=10, row_id=5)
        total = 2000
        with stopped(b.proc):
            for start in range(0, total, 50):
                await a.publish([{"message": rows_created(10, i)} for i in range(start, start + 50)])
                for i in range(start, start + 50):
                    assert (await on_a.recv())["rows"][0]["id"] == i
        # B's client: what B had read before the gap, in order, then page_discard for both pages.
        received = []
        while True:
            got = await on_b.recv()
            if got["type"] != "rows_created":
                break
            received.append(got["rows"][0]["id"])
        assert received == list(range(len(received))) and len(received) < total
        discarded = [got, await on_b.recv()]
        assert sorted(discarded, key=ujson.dumps) == sorted([
            {"type": "page_discard", "page": "table", "parameters": {"table_id": 10}},
            {"type": "page_discard", "page": "row", "parameters": {"table_id": 10, "row_id": 5}},
        ], key=ujson.dumps)
        await marker_to_all(a, on_a, on_b)  # nothing else for B's client: it is on no page now

        seen_b, seen_a = await metrics(b), await metrics(a)
        assert seen_b["tornado_rt_redis_gaps_total"] == 1
        assert seen_b["tornado_rt_redis_envelopes_lost_total"] >= 1
        assert seen_a["tornado_rt_redis_gaps_total"] == 0
        assert "gap 1" in b.log_text() and "page_discard for 2 page subscriptions" in b.log_text()

        # The client resubscribes (and would refetch); delivery goes on.
        await on_b.subscribe("table", table_id=10)
        after = rows_created(10, total)
        await a.publish({"message": after})
        assert await on_a.recv() == after
        assert await on_b.recv() == after
        await marker_to_all(b, on_a, on_b)


@pytest.mark.gen_test(timeout=60)
async def test_a_stream_that_starts_over_is_a_gap_only_where_something_was_unread(connect):
    """FLUSHALL while B is stopped behind A's publishes: B's clients get page_discard and B counts
    a gap; A had read everything, so it only counts the reset and its client keeps its page."""
    import redis.asyncio as aioredis

    with cluster(connect) as (redis, (a, b)):
        for node in (a, b):
            await node.put_directory(DIRECTORY)
        on_a = await connect(a, 1)
        on_b = await connect(b, 2)
        await on_a.subscribe("table", table_id=10)
        await on_b.subscribe("table", table_id=10)
        raw = aioredis.from_url(redis.url)
        try:
            with stopped(b.proc):
                for start in range(0, 600, 100):
                    await a.publish([{"message": rows_created(10, i)} for i in range(start, start + 100)])
                await raw.flushall()
                await a.publish([{"message": rows_created(10, i)} for i in range(600, 610)])
        finally:
            await raw.aclose()
        for i in range(610):
            assert (await on_a.recv())["rows"][0]["id"] == i
        received = []
        while True:
            got = await on_b.recv()
            if got["type"] != "rows_created":
                break
            received.append(got["rows"][0]["id"])
        assert received == list(range(len(received))) and len(received) < 600
        assert got == {"type": "page_discard", "page": "table", "parameters": {"table_id": 10}}
        await marker_to_all(a, on_a, on_b)

        seen_a, seen_b = await metrics(a), await metrics(b)
        assert seen_a["tornado_rt_redis_resets_total"] == 1 and seen_a["tornado_rt_redis_gaps_total"] == 0
        assert seen_b["tornado_rt_redis_resets_total"] == 1 and seen_b["tornado_rt_redis_gaps_total"] == 1


# --- item 8: a 503 during a Redis stall, and retries ----------------------------------------------------

@pytest.mark.gen_test(timeout=90)
async def test_a_publish_refused_during_a_redis_stall_is_never_delivered_and_a_retry_is_delivered_once(connect):
    with cluster(connect) as (redis, (a, b)):
        for node in (a, b):
            await node.put_directory(DIRECTORY)
        on_a = await connect(a, 1)
        on_b = await connect(b, 2)
        await on_a.subscribe("table", table_id=10)
        await on_b.subscribe("table", table_id=10)
        retried = rows_created(10, 1, "retried")
        abandoned = rows_created(10, 2, "abandoned")
        with stopped(redis.proc):
            answers = await asyncio.gather(a.call("POST", "/api/publish", {"message": retried, "id": "order-1"}),
                                           b.call("POST", "/api/publish", {"message": abandoned, "id": "order-2"}))
            for status, body in answers:
                assert status == 503 and "Redis" in body["error"], (status, body)
        for node in (a, b):
            await publish_until_accepted(node)
            # Its stalled publish had been sent to Redis (in flight), not refused before sending.
            assert "publish to Redis failed: no reply from Redis within 2 s" in node.log_text(), node.name
        # The backend retries order-1 (through the other process), then once more (through A).
        await b.publish({"message": retried, "id": "order-1"})
        await a.publish({"message": retried, "id": "order-1"})
        assert await on_a.recv() == retried
        assert await on_b.recv() == retried
        await marker_to_all(a, on_a, on_b)  # order-2 never came, order-1 came once
        for node in (a, b):
            assert (await metrics(node))["tornado_rt_duplicates_dropped_total"] == 1, node.name
