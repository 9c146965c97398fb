"""Limits (issue 5 §1): each limit is a named setting with a documented default, and breaking it
closes only the offending connection with its documented close code (or refuses the upgrade
with its documented HTTP status), while a well-behaved connection keeps receiving: it gets a
message published before the violation and one published after it, then the barrier."""
import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

from conftest import make_token, wait_until
from live_server import logged_errors
from tornado_rt import Settings, closecodes


def rows(n, table_id=10):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": n}], "metadata": {},
            "before_row_id": None}


async def bystander(connect):
    """A well-behaved connection (user 2, a member of workspace 1) on table 10."""
    good = await connect(user_id=2)
    await good.subscribe("table", table_id=10)
    return good


async def still_served(server, good, barrier, n, *others):
    """``good`` receives a page message; then the barrier for it and every other live client."""
    server.publish(rows(n))
    assert await good.recv() == rows(n)
    await barrier(good, *others)


def test_limits_are_settings_with_the_documented_defaults():
    s = Settings()
    assert s.max_message_size == 64 * 1024
    assert (s.max_incoming_rate, s.max_incoming_burst) == (50.0, 200)
    assert s.max_subscriptions == 1000
    assert s.max_connections == 0 and s.max_connections_per_user == 0  # 0 = unlimited
    assert s.max_outgoing_buffer == 8 * 1024 * 1024
    assert (s.ping_interval, s.ping_timeout) == (25.0, 20.0)
    assert (closecodes.MESSAGE_TOO_BIG, closecodes.POLICY_VIOLATION, closecodes.TRY_AGAIN_LATER,
            closecodes.SLOW_CONSUMER, closecodes.GOING_AWAY) == (1009, 4008, 1013, 4009, 1001)
    for name in ("max_message_size", "max_subscriptions", "max_outgoing_buffer"):
        with pytest.raises(ValueError, match=name):
            Settings(**{name: 0})


@pytest.mark.gen_test
async def test_message_over_the_default_size_closes_with_1009(server, connect, barrier, caplog):
    good = await bystander(connect)
    bad = await connect(user_id=1)
    await still_served(server, good, barrier, 1, bad)
    await bad.send(" " * 65536)  # exactly the limit: accepted (and ignored: not an object)
    await barrier(bad, good)
    await bad.send(" " * 65537)
    assert await bad.expect_close() == closecodes.MESSAGE_TOO_BIG
    await still_served(server, good, barrier, 2)
    assert server.counters.closed["message_too_big"] == 1
    assert bad.web_socket_id not in server.hub.connections
    assert not logged_errors(caplog.records)


@pytest.mark.rt_settings(max_message_size=200)
@pytest.mark.gen_test
async def test_message_size_is_configurable_and_counts_bytes(server, connect, barrier):
    good = await bystander(connect)
    bad = await connect(user_id=1)
    await bad.send('"' + "é" * 99 + '"')  # 200 bytes of UTF-8 (101 characters)
    await barrier(bad, good)
    await bad.send('"' + "é" * 100 + '"')  # 202 bytes
    assert await bad.expect_close() == closecodes.MESSAGE_TOO_BIG
    await still_served(server, good, barrier, 1)


@pytest.mark.rt_settings(max_incoming_rate=1, max_incoming_burst=5)
@pytest.mark.gen_test
async def test_incoming_rate_token_bucket_closes_with_4008(server, connect, barrier, caplog):
    good = await bystander(connect)
    bad = await connect(user_id=1)
    await still_served(server, good, barrier, 1)
    for i in range(30):  # every one is answered with page_discard while tokens last
        await bad.send({"remove_page": "dashboard", "dashboard_id": i})
    answered = 0
    while True:
        msg = await bad.conn.read_message()
        if msg is None:
            break
        answered += 1
    assert bad.conn.close_code == closecodes.POLICY_VIOLATION
    # the burst is honoured; refilling at 1/s cannot have paid for all 30
    assert 5 <= answered < 30
    await still_served(server, good, barrier, 2)
    assert server.counters.closed["policy_violation"] == 1
    assert not logged_errors(caplog.records)


@pytest.mark.rt_settings(max_incoming_rate=1, max_incoming_burst=3)
@pytest.mark.gen_test
async def test_rate_limit_is_per_connection(server, connect, barrier):
    a = await connect(user_id=1)
    b = await connect(user_id=1)  # same user, its own bucket
    for client in (a, b):
        for i in range(3):
            await client.send({"remove_page": "dashboard", "dashboard_id": i})
        for i in range(3):
            assert (await client.recv())["type"] == "page_discard"
    await barrier(a, b)


@pytest.mark.rt_settings(max_subscriptions=2)
@pytest.mark.gen_test
async def test_subscriptions_per_connection_close_with_4008(server, connect, barrier, caplog):
    good = await bystander(connect)
    bad = await connect(user_id=1)
    await bad.subscribe("table", table_id=10)
    await bad.subscribe("table", table_id=11)
    await bad.subscribe("table", table_id=10)  # the same page again does not count
    server.publish(rows(1))
    assert await bad.recv() == rows(1)
    assert await good.recv() == rows(1)
    await barrier(good, bad)
    await bad.send({"page": "row", "table_id": 10, "row_id": 1})  # a third page
    assert await bad.expect_close() == closecodes.POLICY_VIOLATION  # no page_add before it
    await still_served(server, good, barrier, 2)
    # the violator's subscriptions are gone from the hub
    assert {c.web_socket_id for c in server.hub.groups["table-10"]} == {good.web_socket_id}
    assert "table-11" not in server.hub.groups
    assert server.counters.closed["policy_violation"] == 1
    assert not logged_errors(caplog.records)


@pytest.mark.rt_settings(max_connections_per_user=2)
@pytest.mark.gen_test
async def test_connections_per_user_refused_with_1013(server, connect, barrier, caplog):
    good = await bystander(connect)
    first = await connect(user_id=1)
    second = await connect(user_id=1)
    await still_served(server, good, barrier, 1, first, second)
    third = await connect(user_id=1, authenticate=False)
    assert await third.expect_close() == closecodes.TRY_AGAIN_LATER  # no authentication message
    await still_served(server, good, barrier, 2, first, second)
    other_user = await connect(user_id=3)  # the limit is per user
    await barrier(first, second, other_user, good)
    first.close()
    await wait_until(lambda: len(server.hub.users[1]) == 1)
    again = await connect(user_id=1)  # a freed slot can be used again
    await barrier(again, second, other_user, good)
    assert not logged_errors(caplog.records)


@pytest.mark.rt_settings(max_connections=3)
@pytest.mark.gen_test
async def test_total_connections_refused_with_http_503(server, connect, barrier, ws_url, caplog):
    good = await bystander(connect)
    a = await connect(user_id=1)
    b = await connect(token="anonymous")  # anonymous connections count too
    await still_served(server, good, barrier, 1, a, b)
    with pytest.raises(HTTPClientError) as refused:
        await websocket_connect(f"{ws_url}?jwt_token={make_token(3)}")
    assert refused.value.code == 503
    await still_served(server, good, barrier, 2, a, b)
    a.close()
    await wait_until(lambda: len(server.hub.connections) == 2)
    c = await connect(user_id=3)
    await barrier(c, b, good)
    assert not logged_errors(caplog.records)
