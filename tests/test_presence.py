"""The presence extension (issue 14, docs/protocol.md "Extensions") over real sockets: the
``presence`` answer, ``presence_joined`` / ``presence_left`` for every way of leaving, in order with
the page's messages, and nothing for connections that never ask or pages they are not on."""
import pytest

from conftest import make_token
from raw_client import RawClient
from tornado_rt.refusals import REFUSALS


def rows_created(n, table_id=10):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": n}], "metadata": {},
            "before_row_id": None}


def presence(users, anonymous=0, table_id=10):
    return {"type": "presence", "page": "table", "parameters": {"table_id": table_id},
            "users": [{"user_id": u, "connections": n} for u, n in users], "anonymous": anonymous}


def event(kind, user_id, table_id=10):
    return {"type": kind, "page": "table", "parameters": {"table_id": table_id}, "user_id": user_id}


async def watcher(connect, user_id=1, table_id=10):
    """A connection subscribed to the table that asked for its presence."""
    w = await connect(user_id=user_id)
    await w.subscribe("table", table_id=table_id)
    await w.send({"presence": "table", "table_id": table_id})
    reply = await w.recv()
    assert reply["type"] == "presence", reply
    return w, reply


@pytest.mark.gen_test
async def test_presence_answer_counts_connections_per_user(connect, barrier):
    a1 = await connect(user_id=2)
    await a1.subscribe("table", table_id=10)
    a2 = await connect(user_id=2)
    await a2.subscribe("table", table_id="10")  # the same page
    b = await connect(user_id=3)
    await b.subscribe("table", table_id=11)  # another page: not counted
    w, reply = await watcher(connect)
    assert reply == presence([(2, 2), (1, 1)])
    # rows: presence per row page too
    await b.subscribe("row", table_id=10, row_id=5)
    await b.send({"presence": "row", "table_id": 10, "row_id": 5})
    assert await b.recv() == {"type": "presence", "page": "row", "parameters": {"table_id": 10, "row_id": 5},
                              "users": [{"user_id": 3, "connections": 1}], "anonymous": 0}
    await barrier(a1, a2, b, w)


@pytest.mark.gen_test
async def test_presence_is_refused_silently(connect, barrier):
    before = {r: REFUSALS.count("presence", r) for r in ("not_subscribed", "missing_parameter", "no_presence")}
    c = await connect(user_id=1)
    await c.send({"presence": "table", "table_id": 10})  # not subscribed
    await c.send({"presence": "nope", "table_id": 10})  # unknown page type
    await c.subscribe("table", table_id=10)
    await c.send({"presence": "table"})  # a required parameter missing
    await c.send({"presence": "table", "table_id": 11})  # subscribed to 10 only
    anon = await connect(token="anonymous")
    await anon.subscribe("view", slug="pub")
    await anon.send({"presence": "view", "slug": "pub"})  # views do not track presence
    await barrier(c, anon)
    assert {r: REFUSALS.count("presence", r) - n for r, n in before.items()} == {
        "not_subscribed": 2, "missing_parameter": 1, "no_presence": 1}  # visible to the operator
    other = await connect(user_id=2)
    await other.subscribe("table", table_id=10)  # c never asked: no presence_joined for it
    await barrier(c, anon, other)


@pytest.mark.gen_test
async def test_joined_and_left_in_order_with_page_messages(server, connect, barrier):
    w, _ = await watcher(connect)
    quiet = await connect(user_id=3)
    await quiet.subscribe("table", table_id=10)  # never asks: gets page messages only
    assert await w.recv() == event("presence_joined", 3)
    server.publish(rows_created(1))
    u2 = await connect(user_id=2)
    await u2.subscribe("table", table_id=10)
    u2b = await connect(user_id=2)
    await u2b.subscribe("table", table_id=10)  # the user's second connection: no event
    server.publish(rows_created(2))
    assert await w.recv() == rows_created(1)
    assert await w.recv() == event("presence_joined", 2)
    assert await w.recv() == rows_created(2)
    assert await quiet.recv() == rows_created(1)
    assert await quiet.recv() == rows_created(2)
    assert await u2.recv() == rows_created(2) and await u2b.recv() == rows_created(2)
    await u2.send({"remove_page": "table", "table_id": 10})
    assert (await u2.recv())["type"] == "page_discard"
    server.publish(rows_created(3))
    assert await u2b.recv() == rows_created(3)
    await u2b.send({"remove_page": "table", "table_id": 10})  # the user's last connection leaves
    assert (await u2b.recv())["type"] == "page_discard"
    server.publish(rows_created(4))
    assert [await w.recv() for _ in range(3)] == [rows_created(3), event("presence_left", 2), rows_created(4)]
    assert [await quiet.recv() for _ in range(2)] == [rows_created(3), rows_created(4)]
    await barrier(w, quiet, u2, u2b)


@pytest.mark.gen_test
async def test_left_for_every_way_of_leaving(server, connect, barrier):
    w, _ = await watcher(connect)
    # close by the client
    c = await connect(user_id=2)
    await c.subscribe("table", table_id=10)
    assert await w.recv() == event("presence_joined", 2)
    c.close()
    assert await w.recv() == event("presence_left", 2)
    # revocation (page_discard sent by the server)
    c = await connect(user_id=2)
    await c.subscribe("table", table_id=10)
    assert await w.recv() == event("presence_joined", 2)
    assert server.revoke([2], "permissions-table-10") == 1
    assert await c.recv() == {"type": "page_discard", "page": "table", "parameters": {"table_id": 10}}
    assert await w.recv() == event("presence_left", 2)
    # forced disconnect
    c = await connect(user_id=3)
    await c.subscribe("table", table_id=10)
    assert await w.recv() == event("presence_joined", 3)
    assert server.disconnect([3]) == 1
    assert await c.recv() == {"type": "force_disconnect"}
    assert await w.recv() == event("presence_left", 3)
    # ping timeout: test_ping_timeout_of_a_silent_peer_is_a_presence_left
    await barrier(w)


@pytest.mark.gen_test
async def test_table_deleted_discards_and_announces(server, connect, barrier):
    w, _ = await watcher(connect, table_id=11)
    c = await connect(user_id=2)
    await c.subscribe("table", table_id=11)
    assert await w.recv() == event("presence_joined", 2, 11)
    server.publish({"type": "table_deleted", "database_id": 1, "table_id": 11})
    deleted = {"type": "table_deleted", "database_id": 1, "table_id": 11}
    discard = {"type": "page_discard", "page": "table", "parameters": {"table_id": 11}}
    assert [await c.recv() for _ in range(2)] == [deleted, discard]
    # the page is gone for everyone: nobody is told who left it, in whatever order they are dropped
    assert [await w.recv() for _ in range(2)] == [deleted, discard]
    await barrier(w, c)
    assert server.presence.watchers == {} and server.presence.store.users == {}


@pytest.mark.gen_test
async def test_a_deleted_table_announces_nothing_whichever_subscriber_goes_first(server, connect, barrier):
    """Several subscribers and watchers on both sides of the watcher: the page goes away for all of
    them at once, so none is told that another left, in whatever order the hub drops them."""
    others = []
    for user_id in (2, 2):
        c = await connect(user_id=user_id)
        await c.subscribe("table", table_id=11)
        others.append(c)
    w, reply = await watcher(connect, table_id=11)
    assert {u["user_id"]: u["connections"] for u in reply["users"]} == {1: 1, 2: 2}
    w2, _ = await watcher(connect, user_id=3, table_id=11)
    assert await w.recv() == event("presence_joined", 3, 11)
    server.publish({"type": "table_deleted", "database_id": 1, "table_id": 11})
    deleted = {"type": "table_deleted", "database_id": 1, "table_id": 11}
    discard = {"type": "page_discard", "page": "table", "parameters": {"table_id": 11}}
    for c in (*others, w, w2):
        assert [await c.recv() for _ in range(2)] == [deleted, discard]
    await barrier(w, w2, *others)
    assert server.presence.watchers == {}


@pytest.mark.gen_test
@pytest.mark.rt_settings(ping_interval=0.2, ping_timeout=0.1)
async def test_ping_timeout_of_a_silent_peer_is_a_presence_left(server, connect, barrier, http_port):
    w, _ = await watcher(connect)  # Tornado's client answers pings
    raw = await RawClient.connect(http_port, f"?jwt_token={make_token(2)}")
    try:
        assert (await raw.recv())["success"] is True
        await raw.send({"page": "table", "table_id": 10})
        assert (await raw.recv())["type"] == "page_add"
        assert await w.recv() == event("presence_joined", 2)
        assert await w.recv() == event("presence_left", 2)  # the heartbeat dropped the silent peer
        assert await raw.close_code() is None  # dropped without a close frame
    finally:
        raw.close()
    await barrier(w)
