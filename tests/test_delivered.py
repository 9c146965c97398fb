"""Publish answers say who got it (issue 11, item 6): ``POST /api/publish`` answers
``{"published": n, "delivered": d}`` and ``publish_async()`` returns ``d``, the number of
connections of this process that were handed the message(s), summed over a batch. Real sockets:
the HTTP API of ``httpapi.make_app`` and real WebSocket clients on one in-process server.
(Redis mode, where ``d`` counts only the publishing process's connections: tests/test_cli.py and
tests/test_settings.py.)"""
import pytest

from standalone import API_KEY, Api
from tornado_rt.httpapi import make_app


@pytest.fixture
def app(server):
    return make_app(server, [API_KEY])


@pytest.fixture
def api(http_server, base_url):
    return Api(base_url)


def rows(table_id=10, n=0):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": n}], "metadata": {}, "before_row_id": None}


@pytest.mark.gen_test
async def test_delivered_counts_the_connections_handed_the_message(server, api, connect, barrier):
    assert await api.publish({"message": rows()}) == {"published": 1, "delivered": 0}  # nobody subscribed
    a = await connect(user_id=1)
    a2 = await connect(user_id=1)
    b = await connect(user_id=2)
    outsider = await connect(user_id=4)
    for client in (a, a2, b):
        await client.subscribe("table", table_id=10)
    assert await api.publish({"message": rows(n=1)}) == {"published": 1, "delivered": 3}
    for client in (a, a2, b):
        assert await client.recv() == rows(n=1)
    await barrier(a, a2, b, outsider)

    # the sender's own connection (WebSocketId header, or ignore_web_socket_id) is not counted
    answer = await api.publish({"message": rows(n=2)}, headers={"WebSocketId": a.web_socket_id})
    assert answer == {"published": 1, "delivered": 2}
    answer = await api.publish({"message": rows(n=3), "ignore_web_socket_id": a2.web_socket_id})
    assert answer == {"published": 1, "delivered": 2}
    # nor are excluded users
    assert await api.publish({"message": rows(n=4), "exclude_user_ids": [1]}) == {"published": 1, "delivered": 1}
    assert [await a.recv() for _ in range(1)] == [rows(n=3)]
    assert [await a2.recv() for _ in range(1)] == [rows(n=2)]
    assert [await b.recv() for _ in range(3)] == [rows(n=2), rows(n=3), rows(n=4)]
    await barrier(a, a2, b, outsider)

    # a batch: summed over its envelopes
    batch = [
        {"message": rows(n=5)},  # a, a2, b
        {"message": {"type": "group_updated", "workspace_id": 1, "workspace": {"id": 1}}},  # a, a2, b
        {"individual": {"1": {"type": "user_data_updated", "user_data": {"for": 1}},  # a, a2
                        "4": {"type": "user_data_updated", "user_data": {"for": 4}},  # outsider
                        "3": {"type": "user_data_updated", "user_data": {"for": 3}}}},  # not connected
        {"message": rows(table_id=11, n=6)},  # nobody on table 11
        {"message": {"type": "all_notifications_cleared"}, "to": {"all_users": True}},  # everyone: 4
    ]
    assert await api.publish(batch) == {"published": 5, "delivered": 3 + 3 + 3 + 0 + 4}
    for client in (a, a2, b, outsider):
        while (await client.recv())["type"] != "all_notifications_cleared":
            pass
    await barrier(a, a2, b, outsider)


@pytest.mark.gen_test
async def test_publish_async_returns_the_count(server, connect, barrier):
    assert await server.publish_async(rows()) == 0
    a = await connect(user_id=1)
    b = await connect(user_id=2)
    anon = await connect(token="anonymous")
    for client in (a, b):
        await client.subscribe("table", table_id=10)
    assert await server.publish_async(rows(n=1)) == 2
    assert await server.publish_async(rows(n=2), ignore_web_socket_id=b.web_socket_id) == 1
    assert await server.publish_async(rows(n=3), exclude_user_ids=[1, 2]) == 0
    assert await server.publish_async({"type": "test_marker"}, {"all_users": True}) == 3
    assert server.publish(rows(n=4)) is None  # publish() stays fire-and-forget
    assert [await a.recv() for _ in range(4)] == [rows(n=1), rows(n=2), {"type": "test_marker"}, rows(n=4)]
    assert [await b.recv() for _ in range(3)] == [rows(n=1), {"type": "test_marker"}, rows(n=4)]
    assert await anon.recv() == {"type": "test_marker"}
    await barrier(a, b, anon)
