"""Cluster-wide recovery (issue 14 §2) with three real ``tornado-rt serve`` processes on a real
``redis-server``: positions are assigned in Redis, so a client that subscribed on one process
recovers on another; outside the history, or after its epoch ended, it gets ``recovered: false``;
and under continuous publishing clients that hop between processes see exactly 1..N."""
import asyncio

import pytest
import redis.asyncio as aioredis

from redis_fixtures import WSClient, redis_server, start_nodes, token  # noqa: F401
from tornado.websocket import websocket_connect

DIRECTORY = {"workspaces": {"1": [1, 2, 3]}, "tables": {"10": 1, "11": 1, "12": 1}}
PREFIX = "recovery-test"


@pytest.fixture(scope="module")
def nodes(redis_server):  # noqa: F811
    started = start_nodes(redis_server.url, 3, ["--history-size", "5", "--redis-channel-prefix", PREFIX])
    yield started
    for node in started:
        node.stop()


def rows_created(n, table_id):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": n}], "metadata": {},
            "before_row_id": None}


async def positioned(node, user_id=1):
    c = WSClient(await websocket_connect(f"{node.ws_url}?jwt_token={token(user_id)}&positions=1"), node)
    assert (await c.recv())["success"] is True
    return c


async def subscribe(client, table_id, since=None):
    frame = {"page": "table", "table_id": table_id}
    if since is not None:
        frame["since"] = since
    await client.send(frame)
    reply = await client.recv()
    assert reply["type"] == "page_add", reply
    return reply


async def marker(nodes, *clients):
    """A marker to every connection through B must be the next message of each client."""
    await nodes[1].publish({"message": {"type": "notifications_fetch_required", "m": 1}, "to": {"all_users": True}})
    for c in clients:
        assert await c.recv() == {"type": "notifications_fetch_required", "m": 1}


@pytest.mark.gen_test(timeout=30)
async def test_recovery_across_processes(nodes, redis_server):  # noqa: F811
    a, b, c = nodes
    for node in nodes:
        await node.put_directory(DIRECTORY)
    first = await positioned(a)
    added = await subscribe(first, 10)
    epoch, start = added["position"]["epoch"], added["position"]["offset"]
    for n in (1, 2):
        await b.publish({"message": rows_created(n, 10)})
        assert await first.recv() == {**rows_created(n, 10), "position": {"epoch": epoch, "offset": start + n}}
    first.close()
    for n in (3, 4):
        await c.publish({"message": rows_created(n, 10)})
    again = await positioned(c)  # another process
    assert await subscribe(again, 10, {"epoch": epoch, "offset": start + 2}) == {
        "type": "page_add", "page": "table", "parameters": {"table_id": 10}, "recovered": True,
        "position": {"epoch": epoch, "offset": start + 2}}
    for n in (3, 4):
        assert await again.recv() == {**rows_created(n, 10), "position": {"epoch": epoch, "offset": start + n}}
    await a.publish({"message": rows_created(5, 10)})
    assert await again.recv() == {**rows_created(5, 10), "position": {"epoch": epoch, "offset": start + 5}}

    # outside the history (--history-size 5): 6 messages after the position
    for n in range(6, 12):
        await a.publish({"message": rows_created(n, 10)})
        assert (await again.recv())["position"]["offset"] == start + n
    late = await positioned(b)
    reply = await subscribe(late, 10, {"epoch": epoch, "offset": start + 5})
    assert reply["recovered"] is False and reply["position"] == {"epoch": epoch, "offset": start + 11}
    # the epoch ended (the page's keys flushed from Redis): not recovered, a new epoch
    raw = aioredis.from_url(redis_server.url)
    try:
        await raw.delete(f"{PREFIX}:pos:table-10", f"{PREFIX}:hist:table-10")
    finally:
        await raw.aclose()
    flushed = await positioned(c)
    reply = await subscribe(flushed, 10, {"epoch": epoch, "offset": start + 11})
    assert reply["recovered"] is False and reply["position"]["epoch"] != epoch
    assert reply["position"]["offset"] == 0
    await marker(nodes, again, late, flushed)  # nothing was replayed to them


@pytest.mark.gen_test(timeout=60)
async def test_no_loss_while_clients_hop_between_processes(nodes):
    """B publishes 1..N (each publish awaited) while three clients drop at different points,
    without reading what is in flight, and resubscribe with their last position on the next
    process: each client's concatenated sequence is exactly 1..N."""
    for node in nodes:
        await node.put_directory(DIRECTORY)
    total = 60
    drops = {0: (10, 11, 40), 1: (1, 25, 26, 59), 2: (33,)}
    subscribed = asyncio.Event()
    ready = []

    async def client(k):
        seen = []
        hop = k
        conn = await positioned(nodes[hop])
        position = (await subscribe(conn, 11))["position"]
        ready.append(k)
        if len(ready) == 3:
            subscribed.set()
        while len(seen) < total:
            message = await conn.recv()
            if message["type"] != "rows_created":
                continue
            seen.append(message["rows"][0]["id"])
            position = message["position"]
            if seen[-1] in drops[k]:
                conn.close()
                hop = (hop + 1) % 3
                conn = await positioned(nodes[hop])
                reply = await subscribe(conn, 11, position)
                assert reply["recovered"] is True and reply["position"] == position
        conn.close()
        return seen

    clients = [asyncio.ensure_future(client(k)) for k in range(3)]
    await subscribed.wait()
    for n in range(1, total + 1):
        await nodes[1].publish({"message": rows_created(n, 11)})
    for seen in await asyncio.gather(*clients):
        assert seen == list(range(1, total + 1))


@pytest.mark.gen_test(timeout=30)
async def test_a_page_nobody_watches_with_positions_keeps_no_history(nodes, redis_server):  # noqa: F811
    for node in nodes:
        await node.put_directory(DIRECTORY)
    plain = WSClient(await websocket_connect(f"{nodes[0].ws_url}?jwt_token={token(1)}"), nodes[0])
    assert (await plain.recv())["success"] is True
    await subscribe(plain, 12)
    await nodes[1].publish({"message": rows_created(1, 12)})
    assert await plain.recv() == rows_created(1, 12)  # no position for a plain connection
    raw = aioredis.from_url(redis_server.url)
    try:
        assert await raw.exists(f"{PREFIX}:pos:table-12", f"{PREFIX}:hist:table-12") == 0
        watcher = await positioned(nodes[2])
        added = await subscribe(watcher, 12)  # the history begins now, at offset 0
        assert added["position"]["offset"] == 0
        await nodes[0].publish({"message": rows_created(2, 12)})
        assert await plain.recv() == rows_created(2, 12)
        assert await watcher.recv() == {**rows_created(2, 12), "position": {**added["position"], "offset": 1}}
        assert await raw.xlen(f"{PREFIX}:hist:table-12") == 1
    finally:
        await raw.aclose()
    await marker(nodes, plain, watcher)
