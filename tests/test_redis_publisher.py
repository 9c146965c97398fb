"""The write-only Redis publisher (issue 13.2): a process that is not a server (a Celery worker, a
script) publishes straight to the Redis stream, and every server process delivers.

Real ``redis-server``, two real ``tornado-rt serve`` processes, and a plain Python subprocess that
publishes with the sync API (no event loop in it). Non-delivery is proved with a marker that must
come next.
"""
import subprocess
import sys
import textwrap

import pytest
import ujson
from tornado.websocket import websocket_connect

from redis_fixtures import (REPO, WSClient, free_port, marker_message, redis_server,  # noqa: F401
                            require_redis_package, start_nodes, token)

PREFIX = "publisher-tests"


def rows_created(table_id, i):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": i}], "metadata": {},
            "before_row_id": None}


@pytest.fixture(scope="module")
def nodes(redis_server):  # noqa: F811
    started = start_nodes(redis_server.url, 2, ["--redis-channel-prefix", PREFIX])
    yield started
    for node in started:
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

    yield _connect
    for client in clients:
        client.close()


SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from tornado_rt.redis_broker import RedisPublisher

    url, prefix = sys.argv[1], sys.argv[2]
    def rows(i):
        return {"type": "rows_created", "table_id": 10, "rows": [{"id": i}], "metadata": {},
                "before_row_id": None}
    with RedisPublisher(url, channel_prefix=prefix) as publisher:
        first = publisher.publish(rows(1))                      # the type's default audience
        publisher.publish(rows(1), id=first)                    # the same id again: dropped
        many = publisher.publish_many([{"message": rows(2)}, {"message": rows(3), "to": {"user_ids": [2]}}])
        publisher.publish_individual({1: {"type": "notifications_fetch_required", "for": 1},
                                      2: {"type": "notifications_fetch_required", "for": 2}})
        try:
            asyncio.get_running_loop()
            print("a loop is running", file=sys.stderr)
            sys.exit(1)
        except RuntimeError:
            pass
        print(json.dumps({"first": first, "many": many}))
""")


@pytest.mark.gen_test(timeout=30)
async def test_a_plain_process_publishes_and_every_server_delivers(nodes, redis_server, connect):  # noqa: F811
    a, b = nodes
    await a.put_directory({"workspaces": {"1": [1, 2]}, "tables": {"10": 1}})
    on_a = await connect(a, 1)
    on_b = await connect(b, 2)
    await on_a.subscribe("table", table_id=10)
    await on_b.subscribe("table", table_id=10)

    result = subprocess.run([sys.executable, "-c", SCRIPT, redis_server.url, PREFIX], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    ids = ujson.loads(result.stdout)
    assert len(ids["many"]) == 2 and ids["first"] not in ids["many"]

    assert await on_a.recv() == rows_created(10, 1)
    assert await on_b.recv() == rows_created(10, 1)
    assert await on_a.recv() == rows_created(10, 2)  # the duplicate id was dropped by both
    assert await on_b.recv() == rows_created(10, 2)
    assert await on_b.recv() == rows_created(10, 3)  # to user 2 only
    assert await on_a.recv() == {"type": "notifications_fetch_required", "for": 1}
    assert await on_b.recv() == {"type": "notifications_fetch_required", "for": 2}
    marker = marker_message()
    await b.publish({"message": marker, "to": {"all_users": True}})
    assert await on_a.recv() == marker and await on_b.recv() == marker


def test_a_bad_message_is_refused_before_anything_is_sent(redis_server):  # noqa: F811
    import redis

    from tornado_rt import PublishError
    from tornado_rt.redis_broker import RedisPublisher

    stream = f"{PREFIX}-bad:stream"
    client = redis.Redis.from_url(redis_server.url)
    publisher = RedisPublisher(redis_server.url, channel_prefix=f"{PREFIX}-bad")
    try:
        with pytest.raises(PublishError) as refused:
            publisher.publish({"type": "rows_created", "rows": [], "metadata": {}, "before_row_id": None})
        assert refused.value.field == "message.table_id", refused.value
        with pytest.raises(PublishError) as refused:
            publisher.publish_many([{"message": rows_created(10, 1)}, {"message": {"type": "no_such_type"}}])
        assert refused.value.field == "[1].message.type", refused.value
        with pytest.raises(PublishError) as refused:
            publisher.publish(rows_created(10, 1), id="not an id")
        assert refused.value.field == "id"
        assert client.xlen(stream) == 0  # nothing was sent, not even the valid first item
        publisher.publish(rows_created(10, 1))
        assert client.xlen(stream) == 1
    finally:
        publisher.close()
        client.close()


def test_publish_many_refuses_an_empty_id_like_every_other_path(redis_server):  # noqa: F811
    import redis

    from tornado_rt import PublishError
    from tornado_rt.redis_broker import RedisPublisher

    stream = f"{PREFIX}-emptyid:stream"
    client = redis.Redis.from_url(redis_server.url)
    publisher = RedisPublisher(redis_server.url, channel_prefix=f"{PREFIX}-emptyid")
    try:
        with pytest.raises(PublishError) as refused:
            publisher.publish(rows_created(10, 1), id="")
        assert refused.value.field == "id"
        with pytest.raises(PublishError) as refused:  # was silently replaced by a fresh UUID
            publisher.publish_many([{"message": rows_created(10, 1), "id": "a-1"},
                                    {"message": rows_created(10, 2), "id": ""}])
        assert refused.value.field == "[1].id", refused.value
        assert client.xlen(stream) == 0  # nothing was sent
        ids = publisher.publish_many([{"message": rows_created(10, 1), "id": "a-1"},
                                      {"message": rows_created(10, 2), "id": None}])
        assert ids[0] == "a-1" and ids[1] not in ("", "a-1", "None")  # no id: a fresh one
        assert client.xlen(stream) == 2  # one stream entry each
    finally:
        publisher.close()
        client.close()


def test_redis_down_raises_a_clear_exception():
    require_redis_package()
    from tornado_rt import BrokerUnavailable
    from tornado_rt.redis_broker import RedisPublisher

    port = free_port()  # nothing listens there
    with RedisPublisher(f"redis://:secret@127.0.0.1:{port}/0", connect_timeout=0.5) as publisher:
        with pytest.raises(BrokerUnavailable) as down:
            publisher.publish(rows_created(10, 1))
    text = str(down.value)
    assert "Redis broker unavailable" in text and str(port) in text, text
    assert "secret" not in text  # the URL is redacted


@pytest.mark.gen_test(timeout=30)
async def test_the_asyncio_publisher_delivers_through_every_server(nodes, redis_server, connect):  # noqa: F811
    from tornado_rt import BrokerUnavailable, PublishError
    from tornado_rt.redis_broker import AsyncRedisPublisher

    a, b = nodes
    await b.put_directory({"workspaces": {"1": [1, 2]}, "tables": {"10": 1}})
    on_a = await connect(a, 1)
    on_b = await connect(b, 2)
    await on_a.subscribe("table", table_id=10)
    await on_b.subscribe("table", table_id=10)
    async with AsyncRedisPublisher(redis_server.url, channel_prefix=PREFIX) as publisher:
        with pytest.raises(PublishError) as refused:
            await publisher.publish({"type": "rows_created", "table_id": 10, "metadata": {},
                                     "before_row_id": None})
        assert refused.value.field == "message.rows"
        key = await publisher.publish(rows_created(10, 41))
        await publisher.publish(rows_created(10, 41), id=key)  # dropped by every server
        await publisher.publish_many([{"message": rows_created(10, 42)}])
    for client in (on_a, on_b):
        assert await client.recv() == rows_created(10, 41)
        assert await client.recv() == rows_created(10, 42)
    marker = marker_message()
    await a.publish({"message": marker, "to": {"all_users": True}})
    assert await on_a.recv() == marker and await on_b.recv() == marker

    async with AsyncRedisPublisher(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5) as down:
        with pytest.raises(BrokerUnavailable) as failed:
            await down.publish(rows_created(10, 1))
    assert "Redis broker unavailable" in str(failed.value)
