"""Cluster-wide presence (issue 14 §8) with three real ``tornado-rt serve`` processes on a real
``redis-server``: a user connected to process A is in a presence answer on process B; a user who
leaves is gone from it; the users of a process killed with SIGKILL disappear once its presence
TTL (``--presence-ttl``, 1 s here) has passed, without anybody cleaning up."""
import asyncio
import signal
import time

import pytest

import ujson
from redis_fixtures import WSClient, redis_server, start_nodes, token  # noqa: F401
from tornado.websocket import websocket_connect

from tornado_rt.envelope import PRESENCE, Envelope
from tornado_rt.redis_broker import RedisBroker

DIRECTORY = {"workspaces": {"1": [1, 2, 3]}, "tables": {"10": 1, "12": 1}}


@pytest.fixture(scope="module")
def nodes(redis_server):  # noqa: F811
    started = start_nodes(redis_server.url, 3, ["--presence-ttl", "1", "--redis-channel-prefix", "presence-test"])
    yield started
    for node in started:
        node.stop()


async def client(node, user_id, table_id=10):
    c = WSClient(await websocket_connect(f"{node.ws_url}?jwt_token={token(user_id)}"), node)
    assert (await c.recv())["success"] is True
    await c.subscribe("table", table_id=table_id)
    return c


async def presence_until(watcher, condition, timeout=10.0, table_id=10):
    """Ask for the table's presence until ``condition(users)`` holds; returns the users."""
    deadline = time.monotonic() + timeout
    while True:
        await watcher.send({"presence": "table", "table_id": table_id})
        reply = await watcher.recv()
        while reply["type"] != "presence":  # presence_joined / _left of this process's users
            reply = await watcher.recv()
        users = {u["user_id"]: u["connections"] for u in reply["users"]}
        if condition(users):
            return users
        assert time.monotonic() < deadline, f"presence never became right: {users}"
        await asyncio.sleep(0.05)  # barrier-ok: bounded polling of another process's state


@pytest.mark.gen_test(timeout=40)
async def test_presence_is_cluster_wide_and_a_killed_process_expires(nodes):
    a, b, c = nodes
    for node in nodes:
        await node.put_directory(DIRECTORY)
    watcher = await client(b, 1)
    on_a = [await client(a, 2), await client(a, 2)]
    on_c = await client(c, 3)
    users = await presence_until(watcher, lambda u: u.get(2) == 2 and u.get(3) == 1)
    assert users == {1: 1, 2: 2, 3: 1}
    on_a[0].close()  # one of user 2's connections leaves: counted at once
    assert await presence_until(watcher, lambda u: u.get(2) == 1) == {1: 1, 2: 1, 3: 1}
    c.proc.send_signal(signal.SIGKILL)  # no clean-up: its user expires with the TTL
    c.proc.wait()
    assert await presence_until(watcher, lambda u: 3 not in u) == {1: 1, 2: 1}
    on_a[1].close()
    assert await presence_until(watcher, lambda u: 2 not in u) == {1: 1}
    watcher.close()
    on_c.close()


@pytest.mark.gen_test(timeout=40)
async def test_joined_and_left_are_cluster_wide_in_order_with_page_messages(nodes):
    a, b = nodes[0], nodes[1]  # (C was killed by the test above when it ran first)
    for node in (a, b):
        await node.put_directory(DIRECTORY)
    watcher = await client(b, 1)
    await presence_until(watcher, lambda u: u == {1: 1})
    quiet = await client(a, 3)  # never asks: gets page messages only
    assert await watcher.recv() == {"type": "presence_joined", "page": "table", "parameters": {"table_id": 10},
                                    "user_id": 3}
    first = await client(a, 2)
    event = await watcher.recv()
    assert event == {"type": "presence_joined", "page": "table", "parameters": {"table_id": 10}, "user_id": 2}
    second = await client(b, 2)  # the user's second connection, on another process: no event
    await a.publish({"message": {"type": "rows_created", "table_id": 10, "rows": [], "metadata": {},
                                 "before_row_id": None}})
    assert (await watcher.recv())["type"] == "rows_created"  # nothing came before it
    for c in (quiet, first, second):
        assert (await c.recv())["type"] == "rows_created"
    first.close()  # not the user's last connection: no event
    await a.publish({"message": {"type": "rows_created", "table_id": 10, "rows": [1], "metadata": {},
                                 "before_row_id": None}})
    assert (await watcher.recv())["rows"] == [1]
    second.close()  # the last one, on the watcher's own process: presence_left through Redis
    assert await watcher.recv() == {"type": "presence_left", "page": "table", "parameters": {"table_id": 10},
                                    "user_id": 2}
    await a.publish({"message": {"type": "rows_created", "table_id": 10, "rows": [2], "metadata": {},
                                 "before_row_id": None}})
    assert (await watcher.recv())["rows"] == [2]
    assert (await quiet.recv())["rows"] == [1] and (await quiet.recv())["rows"] == [2]
    watcher.close()
    quiet.close()


@pytest.mark.gen_test(timeout=40)
async def test_an_event_already_in_an_answer_is_not_sent_after_it(nodes, redis_server):  # noqa: F811
    """The race of a join decided in Redis before a presence answer but delivered (through the
    stream) after it, forced: this test is a third process of the cluster (the real broker and
    presence store, origin T) that holds its presence_joined event until process B has answered."""
    b = nodes[1]
    await b.put_directory(DIRECTORY)
    broker = RedisBroker(redis_server.url, "presence-test")
    await broker.start()
    store = broker.presence_store(30.0)
    decided: "asyncio.Queue[tuple]" = asyncio.Queue()
    store.announce = lambda *event: decided.put_nowait(event)
    await store.start()
    try:
        deadline = time.monotonic() + 10
        while not await store.redis.exists(store.alive_key):  # T's first refresh: T is alive
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)  # barrier-ok: bounded wait for T's first write

        async def publish(kind, user_id, version):  # as RealtimeServer._announce_presence does
            await broker.publish(Envelope(PRESENCE, kind, data=ujson.dumps(list(version)),
                                          audience=["page", "table-12"], user_ids=[user_id]))

        watcher = await client(b, 1, table_id=12)
        # now it watches (user 1's own join reaches Redis one round trip after the subscription)
        await presence_until(watcher, lambda u: u == {1: 1}, table_id=12)
        store.join("table-12", 7)  # user 7's first connection, on T: decided in Redis ...
        kind, group, user_id, joined = await asyncio.wait_for(decided.get(), 10)
        assert (kind, group, user_id) == ("presence_joined", "table-12", 7)
        await watcher.send({"presence": "table", "table_id": 12})  # ... before this answer
        answer = await watcher.recv()
        assert answer["users"] == [{"user_id": 1, "connections": 1}, {"user_id": 7, "connections": 1}]
        await publish(kind, user_id, joined)  # ... and delivered after it: not sent to the watcher
        rows = {"type": "rows_created", "table_id": 12, "rows": [], "metadata": {}, "before_row_id": None}
        await b.publish({"message": rows})
        assert (await watcher.recv())["type"] == "rows_created"  # nothing came before it
        store.leave("table-12", 7)  # a change after the answer is announced
        kind, group, user_id, left = await asyncio.wait_for(decided.get(), 10)
        assert kind == "presence_left" and left[0] == joined[0] and left[1] > joined[1]
        await publish(kind, user_id, left)
        assert await watcher.recv() == {"type": "presence_left", "page": "table", "parameters": {"table_id": 12},
                                        "user_id": 7}
        watcher.close()
    finally:
        await store.close()
        await broker.close()
