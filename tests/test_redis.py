"""The Redis broker (issue 6): several tornado-rt processes act as one server.

Real ``redis-server`` and real ``tornado-rt serve`` subprocesses (see ``redis_fixtures``); clients
on different processes; every audience kind; sender exclusion, force-disconnect and revocation
across processes; per-publisher order (and the same total order on every process); directory
consistency through events; Redis killed and restarted mid-test. The in-process tests at the end
check the broker's own contract: publish returns after local delivery, one Redis message per
publish, malformed channel messages ignored, isolation by channel prefix, fast failure when Redis
is unreachable, close() during publishing, a silent Redis (CLIENT PAUSE) detected by PING, side
effects read from the published text, redis imported lazily, the CLI's refusal to start.

Non-delivery is always proved with a marker that must be the next message received.
"""
import asyncio
import os
import subprocess
import sys

import pytest
import ujson
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.websocket import websocket_connect

from redis_fixtures import (SECRET, RedisProcess, WSClient, free_port, marker_message,  # noqa: F401
                            redis_server, require_redis_binary, require_redis_package, start_nodes,
                            token)
from tornado_rt import BrokerUnavailable, RealtimeServer, Settings
from tornado_rt.redis_broker import parse_refs

DIRECTORY = {
    "workspaces": {"1": [1, 2, 3], "2": [4]},
    "tables": {"10": 1, "11": 1, "20": 2},
    "public_views": {"pub": {"table_id": 10, "token": None}},
}


def rows_created(table_id, **row):
    return {"type": "rows_created", "table_id": table_id, "rows": [row], "metadata": {}, "before_row_id": None}


@pytest.fixture(scope="module")
def nodes(redis_server):  # noqa: F811
    """Three tornado-rt serve processes sharing the session's Redis."""
    started = start_nodes(redis_server.url, 3)
    yield started
    for node in started:
        node.stop()


async def put_directory(nodes, snapshot=DIRECTORY):
    """PUT /api/directory is per process: every process gets the same snapshot."""
    for node in nodes:
        await node.put_directory(snapshot)


@pytest.fixture
def connect(io_loop):
    clients = []

    async def _connect(node, user_id=None):
        """A client of ``node`` for ``user_id`` (None: anonymous), authenticated."""
        tok = "anonymous" if user_id is None else token(user_id)
        client = WSClient(await websocket_connect(f"{node.ws_url}?jwt_token={tok}"), node)
        clients.append(client)
        auth = await client.recv()
        assert auth["type"] == "authentication" and auth["success"] is True, auth
        client.web_socket_id = auth["web_socket_id"]
        return client

    yield _connect
    for client in clients:
        client.close()


@pytest.fixture
def barrier(nodes):
    """``await barrier(*clients, via=node)``: a marker to every connection, published through
    ``via`` (default the first node); it must be the next message of every client. Redis gives all
    processes one total order, so everything accepted before the marker is ahead of it."""

    async def _barrier(*clients, via=None):
        marker = marker_message()
        await (via or nodes[0]).publish({"message": marker, "to": {"all_users": True}})
        for client in clients:
            got = await client.recv()
            assert got == marker, f"{client.node.name}: expected nothing before the marker, got {got}"

    return _barrier


# --- audiences across processes -------------------------------------------------------------------

@pytest.mark.gen_test(timeout=20)
async def test_page_audiences_across_processes(nodes, connect, barrier):
    a, b, c = nodes
    await put_directory(nodes)
    on_a = await connect(a, 1)
    on_b = await connect(b, 2)
    row_on_c = await connect(c, 3)
    anonymous_on_b = await connect(b)
    other_table_on_c = await connect(c, 4)
    await on_a.subscribe("table", table_id=10)
    await on_b.subscribe("table", table_id=10)
    await row_on_c.subscribe("row", table_id=10, row_id=5)
    await anonymous_on_b.subscribe("view", slug="pub", token=None)
    await other_table_on_c.subscribe("table", table_id=20)

    # Newlines, quotes and non-ASCII text survive the wire format unchanged.
    message = rows_created(10, id=1, text='line\nbreak "quoted" é ✓ \u2028')
    await c.publish({"message": message})
    assert await on_a.recv() == message
    assert await on_b.recv() == message

    history = {"type": "row_history_updated", "row_history_entry": {"id": 1}, "table_id": 10, "row_id": 5}
    await a.publish({"message": history})
    assert await row_on_c.recv() == history

    refresh = {"type": "force_view_rows_refresh", "view_id": 3}
    await c.publish({"message": refresh, "to": {"page": "view", "slug": "pub"}})
    assert await anonymous_on_b.recv() == refresh

    await barrier(on_a, on_b, row_on_c, anonymous_on_b, other_table_on_c)


@pytest.mark.gen_test(timeout=20)
async def test_workspace_audiences_across_processes(nodes, connect, barrier):
    a, b, c = nodes
    await put_directory(nodes)
    member_a = await connect(a, 1)
    member_b = await connect(b, 2)
    outsider_c = await connect(c, 4)  # member of workspace 2 only

    created = {"type": "application_created", "application": {"id": 7, "workspace": {"id": 1}}}
    await c.publish({"message": created})
    assert await member_a.recv() == created
    assert await member_b.recv() == created

    both = {"type": "groups_reordered", "workspace_ids": [1, 2]}
    await a.publish({"message": both, "to": {"workspace_ids": [1, 2]}})
    for client in (member_a, member_b, outsider_c):
        assert await client.recv() == both

    # Default audiences resolved from each process's directory: the workspaces of user 4, the
    # workspace of table 10.
    user = {"type": "user_updated", "user": {"id": 4, "username": "d@example.com", "first_name": "D"}}
    await b.publish({"message": user})
    assert await outsider_c.recv() == user
    table = {"type": "table_updated", "table_id": 10, "table": {"id": 10}, "force_table_refresh": False}
    await c.publish({"message": table})
    assert await member_a.recv() == table
    assert await member_b.recv() == table

    await barrier(member_a, member_b, outsider_c)


@pytest.mark.gen_test(timeout=20)
async def test_users_all_users_and_individual_across_processes(nodes, connect, barrier):
    a, b, c = nodes
    await put_directory(nodes)
    u1 = await connect(a, 1)
    u2 = await connect(b, 2)
    u4 = await connect(c, 4)
    anonymous = await connect(c)

    users = {"type": "notifications_created", "notifications": [{"id": 1}]}
    await c.publish({"message": users, "to": {"user_ids": [2, 4]}})
    assert await u2.recv() == users
    assert await u4.recv() == users

    everyone = {"type": "user_data_updated", "user_data": {"active_licenses": []}}
    await a.publish({"message": everyone, "to": {"all_users": True}})
    for client in (u1, u2, u4, anonymous):
        assert await client.recv() == everyone

    own_1 = {"type": "group_restored", "workspace_id": 1, "workspace": {"id": 1, "for": 1}, "applications": []}
    own_2 = {"type": "group_restored", "workspace_id": 1, "workspace": {"id": 1, "for": 2}, "applications": []}
    await b.publish({"individual": {"1": own_1, "2": own_2}})
    assert await u1.recv() == own_1
    assert await u2.recv() == own_2

    await barrier(u1, u2, u4, anonymous)


@pytest.mark.gen_test(timeout=20)
async def test_sender_exclusion_when_sender_is_on_another_process(nodes, connect, barrier):
    a, b, c = nodes
    await put_directory(nodes)
    sender = await connect(a, 1)
    same_user_elsewhere = await connect(b, 1)
    other = await connect(c, 2)
    for client in (sender, same_user_elsewhere, other):
        await client.subscribe("table", table_id=10)

    first = rows_created(10, id=1)
    await c.publish({"message": first, "ignore_web_socket_id": sender.web_socket_id})
    assert await same_user_elsewhere.recv() == first
    assert await other.recv() == first
    await barrier(sender, same_user_elsewhere, other)

    # The WebSocketId header of the REST call, published on a process the sender is not on.
    second = rows_created(10, id=2)
    await b.publish({"message": second}, headers={"WebSocketId": sender.web_socket_id})
    assert await same_user_elsewhere.recv() == second
    assert await other.recv() == second
    await barrier(sender, same_user_elsewhere, other)

    third = rows_created(10, id=3)
    await a.publish({"message": third, "exclude_user_ids": [1]})
    assert await other.recv() == third
    await barrier(sender, same_user_elsewhere, other)


# --- server-initiated changes across processes ------------------------------------------------------

@pytest.mark.gen_test(timeout=20)
async def test_force_disconnect_across_processes(nodes, connect, barrier):
    a, b, c = nodes
    await put_directory(nodes)
    on_a = await connect(a, 1)
    on_b = await connect(b, 1)
    spared_on_c = await connect(c, 1)
    other_user = await connect(a, 2)

    status, body = await b.call("POST", "/api/disconnect",
                                {"user_ids": [1], "ignore_web_socket_ids": [spared_on_c.web_socket_id]})
    assert status == 200, body
    assert body == {"disconnected": 1}  # the connections of *this* process
    for client in (on_a, on_b):
        assert await client.recv() == {"type": "force_disconnect"}
        assert await client.closed() == 4003
    await barrier(spared_on_c, other_user)


@pytest.mark.gen_test(timeout=20)
async def test_revoke_across_processes(nodes, connect, barrier):
    a, b, c = nodes
    await put_directory(nodes)
    user = await connect(a, 1)
    peer = await connect(b, 2)
    await user.subscribe("table", table_id=10)
    await user.subscribe("row", table_id=10, row_id=5)
    await user.subscribe("table", table_id=11)
    await peer.subscribe("table", table_id=10)

    status, body = await c.call("POST", "/api/revoke", {"user_ids": [1], "permission_group": "permissions-table-10"})
    assert status == 200, body
    assert body == {"discarded": 0}  # node C holds none of user 1's pages
    discarded = [await user.recv(), await user.recv()]
    assert sorted(discarded, key=ujson.dumps) == sorted([
        {"type": "page_discard", "page": "table", "parameters": {"table_id": 10}},
        {"type": "page_discard", "page": "row", "parameters": {"table_id": 10, "row_id": 5}},
    ], key=ujson.dumps)

    on_10, on_11 = rows_created(10, id=1), rows_created(11, id=1)
    await c.publish({"message": on_10})
    await c.publish({"message": on_11})
    assert await peer.recv() == on_10
    assert await user.recv() == on_11  # table 10's message did not come first
    await barrier(user, peer)


# --- order and consistency --------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_order_per_publisher_and_one_total_order(nodes, connect, barrier):
    """Two processes publish 300 messages each, concurrently: every client on every process gets
    each publisher's messages in publish order — and all of them get the same interleaving."""
    a, b, c = nodes
    await put_directory(nodes)
    clients = [await connect(node, 1) for node in nodes]
    for client in clients:
        await client.subscribe("table", table_id=10)

    async def burst(node, tag):
        for start in range(0, 300, 30):
            await node.publish([{"message": rows_created(10, id=i, by=tag)} for i in range(start, start + 30)])

    await asyncio.gather(burst(a, "a"), burst(b, "b"))
    sequences = []
    for client in clients:
        got = [(m["rows"][0]["by"], m["rows"][0]["id"]) for m in [await client.recv() for _ in range(600)]]
        for tag in "ab":
            assert [i for by, i in got if by == tag] == list(range(300)), (client.node.name, tag)
        sequences.append(got)
    assert sequences[0] == sequences[1] == sequences[2]
    await barrier(*clients)


@pytest.mark.gen_test(timeout=20)
async def test_directory_consistency_through_events(nodes, connect, barrier):
    """Membership lives in each process's directory and is changed only by envelopes, which every
    process applies at the same place in the same order: a member added through A counts in a
    workspace message published through B, and a member removed through C no longer does in a
    message published through A."""
    a, b, c = nodes
    await put_directory(nodes, {"workspaces": {"5": [1]}, "tables": {"50": 5}, "public_views": {}})
    member = await connect(a, 1)
    newcomer = await connect(b, 2)
    await newcomer.send({"page": "table", "table_id": 50})  # refused: not a member yet (no reply)

    workspace_user = {"id": 99, "user_id": 2, "permissions": "MEMBER"}
    added = {"type": "group_user_added", "id": 99, "workspace_id": 5, "workspace_user": workspace_user}
    await a.publish({"message": added})
    created = {"type": "application_created", "application": {"id": 7, "workspace": {"id": 5}}}
    await b.publish({"message": created})
    for client in (member, newcomer):
        assert await client.recv() == added
        assert await client.recv() == created
    for node in nodes:
        assert (await node.directory())["workspaces"]["5"] == [1, 2], node.name
    await newcomer.subscribe("table", table_id=50)  # B's access check sees the new member

    deleted = {"type": "group_user_deleted", "id": 99, "workspace_id": 5, "workspace_user": workspace_user}
    await c.publish({"message": deleted})
    updated = {"type": "group_updated", "workspace_id": 5, "workspace": {"id": 5, "name": "W"}}
    await a.publish({"message": updated})
    assert await member.recv() == deleted
    assert await member.recv() == updated
    assert await newcomer.recv() == deleted
    assert await newcomer.recv() == {"type": "page_discard", "page": "table", "parameters": {"table_id": 50}}
    await barrier(member, newcomer)  # the newcomer did not get `updated`
    for node in nodes:
        assert (await node.directory())["workspaces"]["5"] == [1], node.name


# --- Redis failure ----------------------------------------------------------------------------------

async def publish_until_accepted(node, attempts=400):
    """Retry a publish (to a user nobody is connected as) until the process accepts it again: its
    subscription is back. Bounded (about 20 s)."""
    for _ in range(attempts):
        status, body = await node.call("POST", "/api/publish",
                                       {"message": marker_message(), "to": {"user_ids": [999999]}})
        if status == 200:
            return
        assert status == 503, (status, body)
        await asyncio.sleep(0.05)  # barrier-ok: retry interval of a bounded poll, nothing asserted on time
    raise AssertionError(f"{node.name} did not accept publishes again after Redis came back")


@pytest.mark.gen_test(timeout=50)
async def test_redis_killed_and_restarted(connect):
    redis = RedisProcess(require_redis_binary()).start()
    a, b = started = start_nodes(redis.url, 2)
    try:
        await put_directory(started)
        x = await connect(a, 1)
        y = await connect(b, 2)
        await x.subscribe("table", table_id=10)
        await y.subscribe("table", table_id=10)
        before = rows_created(10, id=1)
        await a.publish({"message": before})
        assert await x.recv() == before
        assert await y.recv() == before

        redis.kill()
        lost = rows_created(10, id=2)
        for node in started:
            status, body = await node.call("POST", "/api/publish", {"message": lost})
            assert status == 503, (node.name, status, body)
            assert isinstance(body, dict) and isinstance(body.get("error"), str) and "Redis" in body["error"], body
        for path, body in (("/api/disconnect", {"user_ids": [1]}),
                           ("/api/revoke", {"user_ids": [1], "permission_group": "permissions-table-10"})):
            status, answer = await a.call("POST", path, body)
            assert status == 503 and "Redis" in answer["error"], (path, status, answer)
        # The WebSocket clients are still connected and served by their process.
        await x.subscribe("table", table_id=11)
        await y.subscribe("table", table_id=11)

        redis.start()  # same port
        for node in started:
            await publish_until_accepted(node)
        after = rows_created(10, id=3)
        await b.publish({"message": after})
        assert await x.recv() == after  # the refused message was never delivered
        assert await y.recv() == after
        on_11 = rows_created(11, id=4)
        await a.publish({"message": on_11})
        assert await x.recv() == on_11
        assert await y.recv() == on_11
        x.close()  # before stopping the nodes, which would otherwise wait for these to go
        y.close()
    finally:
        for node in started:
            node.stop()
        redis.kill()


# --- the broker in-process ---------------------------------------------------------------------------

class InProcess:
    """A RealtimeServer with a RedisBroker, listening on a free port of the test's IOLoop."""

    def __init__(self, redis_url, *args, directory=DIRECTORY, settings=None, **broker_options):
        from tornado_rt.redis_broker import RedisBroker

        self.server = RealtimeServer(Settings(jwt_secret=SECRET, ping_interval=0, **(settings or {})),
                                     load_entry_points=False, broker=RedisBroker(redis_url, *args, **broker_options))
        self.server.directory.load(directory)
        sock, port = bind_unused_port()
        self.http = HTTPServer(self.server.make_app())
        self.http.add_sockets([sock])
        self.ws_url = f"ws://127.0.0.1:{port}/ws/core/"
        self.name = f"in-process:{port}"

    async def stop(self):
        self.http.stop()
        await self.server.shutdown(timeout=1)


@pytest.mark.gen_test(timeout=20)
async def test_publish_returns_after_local_delivery_and_crosses_redis_once(redis_server, connect):  # noqa: F811
    import redis.asyncio as aioredis

    node = InProcess(redis_server.url)
    raw = aioredis.from_url(redis_server.url)

    async def next_entries(after, count):
        """The stream entries after id ``after`` (Redis Streams replaced pub/sub, issue 10)."""
        found = await raw.xread({stream: after}, count=count + 1, block=5000)
        return found[0][1] if found else []

    try:
        await node.server.start()
        # A plain page message goes to the inbox of each process registered for its page (issue 16).
        stream = node.server.broker.inbox
        top = await raw.xrevrange(stream, count=1)
        after = top[0][0] if top else b"0-0"
        clients = [await connect(node, user) for user in (1, 2, 3)]
        for client in clients:
            await client.subscribe("table", table_id=10)

        message = rows_created(10, id=1)
        await node.server.publish_async(message)
        # Returned only after this process handed it to its connections.
        assert node.server.stats()["messages_delivered"] == 3
        for client in clients:
            assert await client.recv() == message
        # One Redis entry for three recipients; the next one in the stream is the next publish.
        # The publisher's own inbox gets a reference to its publish (field R: "<seq>:<seq>;", or
        # "<seq>,<epoch>,<offset>;" with a history position), not the bytes: it holds the envelope
        # (issue 16.5).
        entries = await next_entries(after, 1)
        assert len(entries) == 1
        first_id, fields = entries[0]
        assert b"e" not in fields and b"E" not in fields
        ([first_seq], _) = parse_refs(fields[b"R"])
        second = rows_created(10, id=2)
        await node.server.publish_async(second)
        entries = await next_entries(first_id, 1)
        assert len(entries) == 1
        assert parse_refs(entries[0][1][b"R"]) == ([first_seq + 1], None)
        for client in clients:
            assert await client.recv() == second

        # A large message takes many reads to come back, while Redis's reply to the script takes
        # one: returning on the reply instead of on the echo would be caught here.
        big = rows_created(10, id=3, text="x" * (3 * 1024 * 1024))
        await node.server.publish_async(big)
        assert node.server.stats()["messages_delivered"] == 9
        for client in clients:
            assert await client.recv() == big
    finally:
        await raw.aclose()
        await node.stop()


@pytest.mark.gen_test(timeout=20)
async def test_malformed_channel_messages_are_ignored(redis_server, connect):  # noqa: F811
    import redis.asyncio as aioredis

    node = InProcess(redis_server.url)
    raw = aioredis.from_url(redis_server.url)
    try:
        await node.server.start()
        client = await connect(node, 1)
        await client.subscribe("table", table_id=10)
        for junk in (b"not json", b'{"k": "no-such-kind"}', b"[1, 2]", b'{"t": "no kind"}\n{}', b"\xff\xfe"):
            await raw.publish("tornado-rt:envelopes", junk)  # the pub/sub channel of old: ignored
            await raw.xadd("tornado-rt:stream", {"e": junk})  # not an entry of ours
            top = (await raw.xrevrange("tornado-rt:stream", count=1))[0][0]
            await raw.xadd("tornado-rt:stream", {"t": 1, "e": junk},  # one of ours, but junk
                           id=b"%d-0" % (int(top.split(b"-")[0]) + 1))
        message = rows_created(10, id=1)
        await node.server.publish_async(message)
        assert await client.recv() == message
        assert node.server.broker.connected
    finally:
        await raw.aclose()
        await node.stop()


@pytest.mark.gen_test(timeout=20)
async def test_channel_prefix_separates_servers(redis_server, connect):  # noqa: F811
    one = InProcess(redis_server.url, channel_prefix="tenant-one")
    two = InProcess(redis_server.url, channel_prefix="tenant-two")
    try:
        await one.server.start()
        await two.server.start()
        listener = await connect(two, 1)
        await one.server.publish_async({"type": "user_data_updated", "n": 1}, {"all_users": True})
        marker = marker_message()
        await two.server.publish_async(marker, {"all_users": True})
        assert await listener.recv() == marker
    finally:
        await one.stop()
        await two.stop()


@pytest.mark.gen_test(timeout=20)
async def test_unreachable_redis_fails_fast_with_a_clear_error():
    require_redis_package()
    from tornado_rt.redis_broker import RedisBroker, redact_url

    broker = RedisBroker(f"redis://:hunter2@127.0.0.1:{free_port()}/0", start_timeout=0.5)
    with pytest.raises(BrokerUnavailable) as refused:
        broker.publish(None)
    assert "not started" in str(refused.value)
    with pytest.raises(BrokerUnavailable) as failed:
        await broker.start()
    assert "127.0.0.1" in str(failed.value) and "hunter2" not in str(failed.value)
    assert not broker.connected
    assert redact_url("unix:///run/redis.sock?db=1&password=hunter2") == "unix:///run/redis.sock?db=1&password=***"
    assert redact_url("rediss://app:hunter2@cache.internal:6380/2") == "rediss://app:***@cache.internal:6380/2"


@pytest.mark.gen_test(timeout=30)
async def test_close_while_publishing_never_hangs_and_settles_every_publish(redis_server):  # noqa: F811
    """close() cancels the writer at every stage of a batch (some publishes still in flight):
    it returns, and every publish future ends — delivered, or failed with BrokerUnavailable."""
    from tornado_rt.redis_broker import RedisBroker
    from tornado_rt.envelope import message_envelope

    server = RealtimeServer(Settings(jwt_secret=SECRET, ping_interval=0), load_entry_points=False)
    for round_ in range(40):
        broker = RedisBroker(redis_server.url, channel_prefix=f"closing-{round_}")
        delivered = []
        broker.attach(delivered.append)
        await broker.start()
        futures = [broker.publish(message_envelope(server.registry, rows_created(10, id=i), {"all_users": True}))
                   for i in range(200)]
        await asyncio.wait(futures[:round_ * 5 + 1])  # close at a different point each round
        async with asyncio.timeout(10):  # a bound for a hang, not a speed expectation
            await broker.close()
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(r is None or isinstance(r, BrokerUnavailable) for r in results), results
        assert len(delivered) == sum(1 for r in results if r is None)
        with pytest.raises(BrokerUnavailable):
            broker.publish(message_envelope(server.registry, rows_created(10, id=0), {"all_users": True}))


@pytest.mark.gen_test(timeout=30)
async def test_a_silent_redis_is_detected_and_the_subscription_replaced(redis_server, connect):  # noqa: F811
    """CLIENT PAUSE makes Redis keep the connection open but answer nothing (like a network
    partition): the PING watchdog gives up on the subscription, which is made again once Redis
    answers; delivery resumes."""
    import redis.asyncio as aioredis

    node = InProcess(redis_server.url, channel_prefix="silent", health_check_interval=0.2)
    raw = aioredis.from_url(redis_server.url)
    try:
        await node.server.start()
        client = await connect(node, 1)
        broker = node.server.broker
        assert broker.subscriptions == 1
        await raw.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        for _ in range(400):  # bounded wait for the new subscription (about 20 s)
            if broker.subscriptions >= 2 and broker.connected:
                break
            await asyncio.sleep(0.05)  # barrier-ok: bounded poll of a state change
        assert broker.subscriptions >= 2 and broker.connected
        message = {"type": "user_data_updated", "after": "pause"}
        await node.server.publish_async(message, {"all_users": True})
        assert await client.recv() == message
    finally:
        await raw.aclose()
        await node.stop()


def test_importing_tornado_rt_does_not_import_redis():
    require_redis_package()
    code = ("import sys, tornado_rt; assert 'redis' not in sys.modules, 'redis imported'; "
            "from tornado_rt import RedisBroker; assert 'redis' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_serve_with_an_unreachable_redis_exits_with_one_clear_line():
    """The CLI refuses to start (exit 2) when Redis cannot be reached, without leaking the password."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = subprocess.run(
        [sys.executable, "-m", "tornado_rt", "serve", "--port", "0", "--jwt-secret", SECRET,
         "--api-key", "k", "--broker", url],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("TORNADO_RT_")})
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--broker" in lines[0] and "Redis" in lines[0], result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.gen_test(timeout=20)
async def test_side_effects_read_what_was_published_not_the_callers_dict(redis_server):  # noqa: F811
    """The publishing process applies a side effect when its envelope comes back from Redis; a
    caller that reuses its message dict meanwhile must not change what this process applies."""
    node = InProcess(redis_server.url, channel_prefix="effects")
    try:
        await node.server.start()
        message = {"type": "group_user_added", "id": 1, "workspace_id": 1, "workspace_user": {"user_id": 77}}
        node.server.publish(message)
        message["workspace_user"]["user_id"] = 78  # reused before the envelope came back
        await node.server.publish_async({"type": "user_data_updated"}, {"all_users": True})
        members = node.server.directory.workspace_members(1)
        assert 77 in members and 78 not in members
    finally:
        await node.stop()
