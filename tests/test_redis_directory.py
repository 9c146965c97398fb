"""One directory for the whole cluster (issue 12.4): with the Redis broker, a directory change
through any process changes the directory of every process, in the order of the events, and the
latest snapshot is kept in Redis so that a process that starts loads it before it serves anyone.

Three real ``tornado-rt serve`` processes on a real ``redis-server`` of this module (killed and
restarted in the last test). Non-delivery and "already applied" are proved with the stream's
total order: an answer from process X comes after X applied its own change, hence after every
change acknowledged before it was sent.
"""
import asyncio
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import ujson
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from redis_fixtures import (API_KEY, SECRET, Node, RedisProcess, WSClient, marker_message,
                            require_redis_binary, start_nodes, token)

DIRECTORY = {"workspaces": {"1": [1, 2]}, "tables": {"10": 1}, "public_views": {}}
KEY = "tornado-rt:directory"


@pytest.fixture(scope="module")
def redis_proc():
    proc = RedisProcess(require_redis_binary()).start()
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def cluster(redis_proc):
    """Three processes (a list that tests may change when they restart one)."""
    nodes = start_nodes(redis_proc.url, 3)
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture
def connect(io_loop):
    clients = []

    async def _connect(node, user_id):
        client = WSClient(await websocket_connect(f"{node.ws_url}?jwt_token={token(user_id)}"), node)
        clients.append(client)
        auth = await client.recv()
        assert auth["type"] == "authentication" and auth["success"] is True, auth
        return client

    _connect.clients = clients
    yield _connect
    for client in clients:
        client.close()


def stored_snapshot(redis_proc):
    """(position, snapshot) of the directory kept in Redis, or None."""
    import redis

    client = redis.Redis.from_url(redis_proc.url)
    try:
        position, text = client.hmget(KEY, "p", "s")
    finally:
        client.close()
    return None if position is None else (int(position), ujson.loads(text))


def wait_for(condition, what, timeout=15):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # barrier-ok: polling until the processes reconnected to the new Redis


async def subscribed(client, page, **params):
    """The next message after a subscription request (page_add when it was accepted; a refused
    one gets no answer: see ``refused``)."""
    await client.send({"page": page, **params})
    return await client.recv()


async def refused(client, node, user_id, page, **params):
    """Subscribe and prove it was refused: the next message is a marker sent to the user."""
    await client.send({"page": page, **params})
    marker = marker_message()
    await node.publish({"message": marker, "to": {"user_ids": [user_id]}})
    got = await client.recv()
    assert got == marker, f"{node.name}: expected the subscription to be refused, got {got}"


async def member(node, method, workspace_id, user_id):
    """PUT / DELETE /api/directory/workspaces/{workspace_id}/members/{user_id} (no body)."""
    request = HTTPRequest(f"{node.http_url}/api/directory/workspaces/{workspace_id}/members/{user_id}",
                          method=method, headers={"Authorization": f"Bearer {API_KEY}"},
                          body=b"" if method == "PUT" else None, request_timeout=15)
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    assert response.code == 200, (node.name, response.code, response.body, node.log_text())


async def accepting(node, attempts=400):
    """Publish (to a user nobody is) until the process accepts publishes again after Redis came
    back (its first publish on the broken connection is answered 503: no command retries)."""
    for _ in range(attempts):
        status, body = await node.call("POST", "/api/publish",
                                       {"message": marker_message(), "to": {"user_ids": [999999]}})
        if status == 200:
            return
        assert status == 503, (status, body)
        await asyncio.sleep(0.05)  # barrier-ok: retry interval of a bounded poll, nothing asserted on time
    raise AssertionError(f"{node.name} did not accept publishes again after Redis came back")


def restart(nodes, index, redis_url):
    nodes[index].stop()
    nodes[index] = Node(nodes[index].name + "'", redis_url).wait_started()
    return nodes[index]


@pytest.mark.gen_test(timeout=60)
async def test_one_directory_for_the_cluster(cluster, redis_proc, connect):
    a, b, c = cluster
    # PUT through A: B and C answer subscriptions with it (B and C applied it before anything
    # published after A's answer, and the subscription below comes after that answer).
    await a.put_directory(DIRECTORY)
    on_b = await connect(b, 1)
    on_c = await connect(c, 2)
    assert (await subscribed(on_b, "table", table_id=10))["type"] == "page_add"
    assert (await subscribed(on_c, "table", table_id=10))["type"] == "page_add"
    # User 3 is not a member yet: refused on B.
    three_on_b = await connect(b, 3)
    await refused(three_on_b, b, 3, "table", table_id=10)

    # Incremental changes through C, then a workspace message through C: B applies the
    # membership before the message (same order on every process), so user 3 on B gets it.
    status, body = await c.call("PUT", "/api/directory/tables/11", {"workspace_id": 1})
    assert (status, body) == (200, {"ok": True})
    await member(c, "PUT", 1, 3)
    hello = {"type": "notifications_fetch_required", "hello": "workspace 1"}
    await c.publish({"message": hello, "to": {"workspace_id": 1}})
    assert await three_on_b.recv() == hello
    assert await on_b.recv() == hello and await on_c.recv() == hello

    # Visible on A: A's answer to its own change comes after it applied C's (earlier) ones.
    status, _ = await a.call("PUT", "/api/directory/public_views/pub", {"table_id": 11, "token": None})
    assert status == 200
    expected = {"workspaces": {"1": [1, 2, 3]}, "tables": {"10": 1, "11": 1},
                "public_views": {"pub": {"table_id": 11, "token": None}}}
    assert await a.directory() == expected
    assert (await subscribed(three_on_b, "table", table_id=11))["type"] == "page_add"
    # A refused change is refused by the process that receives it, before anything is sent.
    status, body = await b.call("PUT", "/api/directory", {"workspaces": {"1": [1, "x y", None]}})
    assert status == 400 and body["field"] == "workspaces.1[2]", body
    assert await b.directory() == expected

    # The snapshot in Redis is the directory, at a position in the stream.
    position, snapshot = stored_snapshot(redis_proc)
    assert snapshot == expected and position > 0

    # Restart B: it loads the snapshot before it accepts subscriptions; no new PUT.
    b = restart(cluster, 1, redis_proc.url)
    on_new_b = await connect(b, 3)
    assert (await subscribed(on_new_b, "table", table_id=11))["type"] == "page_add"
    assert await b.directory() == expected
    # ... and it follows later changes like the others.
    await member(a, "DELETE", 1, 3)
    status, _ = await b.call("PUT", "/api/directory/workspaces/2", {"members": [9]})
    assert status == 200
    await refused(on_new_b, b, 3, "table", table_id=10)
    expected["workspaces"] = {"1": [1, 2], "2": [9]}
    assert await b.directory() == expected


@pytest.mark.gen_test(timeout=90)
async def test_redis_restarted_without_persistence(cluster, redis_proc, connect):
    """Redis loses the stream and the snapshot: every process keeps its directory in memory and
    writes it back to the new Redis (re-seed); a process started afterwards loads it."""
    a, b, c = cluster
    await a.put_directory(DIRECTORY)
    await member(c, "PUT", 1, 5)  # C's answer: C applied both
    expected = {"workspaces": {"1": [1, 2, 5]}, "tables": {"10": 1}, "public_views": {}}
    wait_for(lambda: (stored_snapshot(redis_proc) or (0, None))[1] == expected, "the snapshot")

    redis_proc.restart()  # SIGKILL, then a fresh redis-server without data on the same port
    wait_for(lambda: stored_snapshot(redis_proc) is not None, "the processes to re-seed the snapshot")
    assert stored_snapshot(redis_proc)[1] == expected
    for node in cluster:
        await accepting(node)

    # C kept its directory; A (restarted) loads the re-seeded snapshot.
    on_c = await connect(c, 5)
    assert (await subscribed(on_c, "table", table_id=10))["type"] == "page_add"
    a = restart(cluster, 0, redis_proc.url)
    assert await a.directory() == expected
    on_a = await connect(a, 5)
    assert (await subscribed(on_a, "table", table_id=10))["type"] == "page_add"
    # Changes flow again on the new stream: through A, applied by C before C's own answer.
    await member(a, "DELETE", 1, 5)
    status, _ = await c.call("PUT", "/api/directory/tables/12", {"workspace_id": 1})
    assert status == 200
    assert (await c.directory())["workspaces"] == {"1": [1, 2]}
    message = {"type": "notifications_fetch_required", "after": "restart"}
    status, _ = await b.call("POST", "/api/publish", {"message": message, "to": {"user_ids": [5]}})
    assert status == 200
    assert await on_c.recv() == message and await on_a.recv() == message


@pytest.mark.gen_test(timeout=60)
async def test_a_process_behind_the_trimmed_stream_loads_the_snapshot(connect):
    """B is stopped while A publishes far more than the stream keeps, changes the directory, and
    publishes as much again: B has a gap that holds the change. B loads the snapshot from Redis
    before going on (and only then tells its clients with page_discard), so its directory has the
    change; without it B would lack member 7 for good."""
    redis_proc = RedisProcess(require_redis_binary()).start()
    a, b = nodes = start_nodes(redis_proc.url, 2, ["--redis-stream-length", "50"])

    async def flood():  # batches no larger than the stream, so that A reads all of its own
        for _ in range(12):
            await a.publish([{"message": marker_message(), "to": {"user_ids": [999999]}} for _ in range(50)])

    try:
        await a.put_directory(DIRECTORY)
        on_b = await connect(b, 1)
        assert (await subscribed(on_b, "table", table_id=10))["type"] == "page_add"
        b.proc.send_signal(signal.SIGSTOP)
        try:
            await flood()  # B's pending read may hold the first of these, never the change
            await member(a, "PUT", 1, 7)
            wait_for(lambda: 7 in stored_snapshot(redis_proc)[1]["workspaces"]["1"], "A's snapshot")
            await flood()  # the change is trimmed from the stream too
        finally:
            b.proc.send_signal(signal.SIGCONT)
        # B's client hears of the gap once B synced its directory.
        assert await on_b.recv() == {"type": "page_discard", "page": "table", "parameters": {"table_id": 10}}
        assert (await b.directory())["workspaces"] == {"1": [1, 2, 7]}
        log = b.log_text()
        assert "gap 1" in log and "directory loaded from Redis after the gap" in log, log
        on_b7 = await connect(b, 7)
        assert (await subscribed(on_b7, "table", table_id=10))["type"] == "page_add"
    finally:
        for client in connect.clients:
            client.close()
        for node in nodes:
            node.stop()
        redis_proc.kill()


@pytest.mark.gen_test(timeout=30)
async def test_the_snapshot_moves_forward_without_being_sent_again(redis_proc):
    """In-process: after ``snapshot_every`` entries without a change, the stored snapshot's
    position moves forward (only its position: the snapshot is the same), so that a process
    that starts reads less of the stream; that process loads it."""
    import redis.asyncio as aioredis

    from tornado_rt import RealtimeServer, Settings
    from tornado_rt.redis_broker import RedisBroker

    def make():
        broker = RedisBroker(redis_proc.url, channel_prefix="advance", share_directory=True, snapshot_every=20)
        return RealtimeServer(Settings(jwt_secret=SECRET, ping_interval=0), load_entry_points=False,
                              broker=broker)

    raw = aioredis.from_url(redis_proc.url)

    async def stored():
        position, text = await raw.hmget("advance:directory", "p", "s")
        return (0, None) if position is None else (int(position), ujson.loads(text))

    async def until(condition, what):
        deadline = time.monotonic() + 10
        while not condition(await stored()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)  # barrier-ok: the snapshot is written after the answer

    one, two = make(), None
    await one.start()
    try:
        await one.change_directory("set_workspace", 1, [5])
        await one.change_directory("set_table", 10, 1)
        expected = {"workspaces": {"1": [5]}, "tables": {"10": 1}, "public_views": {}}
        await until(lambda got: got[1] == expected, "the snapshot")
        first, _ = await stored()
        for _ in range(3):
            await one.submit([one_envelope(one, i) for i in range(20)])
        await until(lambda got: got[0] > first, "the snapshot to move forward")
        assert (await stored())[1] == expected
        assert one.broker.snapshot_advances >= 1 and one.broker.snapshots_written >= 1
        two = make()
        await two.start()
        assert two.directory.snapshot() == expected
        assert two.broker.position >= one.broker.position
    finally:
        await one.shutdown(timeout=1)
        if two is not None:
            await two.shutdown(timeout=1)
        await raw.aclose()


def one_envelope(server, i):
    from tornado_rt.envelope import message_envelope

    return message_envelope(server.registry, {"type": "notifications_fetch_required", "i": i},
                            {"user_ids": [999999]})


def test_directory_file_with_redis_broker_is_refused(redis_proc):
    """--directory FILE keeps one process's directory; with the Redis broker the directory lives in
    Redis: the combination is refused at start (exit 2, naming --directory)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        result = subprocess.run(
            [sys.executable, "-m", "tornado_rt", "serve", "--port", "0", "--jwt-secret", SECRET,
             "--api-key", API_KEY, "--broker", redis_proc.url, "--directory", f.name],
            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result
    assert "--directory" in result.stderr and "Redis" in result.stderr, result.stderr
