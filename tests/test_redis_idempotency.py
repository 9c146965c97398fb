"""Idempotency keys (issue 10 item 8) in local mode and their validation; the Redis side is in
``test_redis_streams.py``.

* Duplicate ids are delivered once: in one HTTP batch, across HTTP requests, through the Python
  API (``publish``, ``publish_individual``, ``publish_async``), against a real ``tornado-rt serve``
  subprocess (in-process broker) or a real listening server. Non-delivery is proved with a marker.
* A bad id is refused with 400 naming the field (HTTP) or a PublishError (Python).
* The window itself (pure logic, no sockets): by age and by count.
"""
import pytest

from redis_fixtures import Node, WSClient, marker_message, token
from tornado.websocket import websocket_connect
from tornado_rt import PublishError
from tornado_rt.broker import RecentIds

DIRECTORY = {"workspaces": {"1": [1, 2]}, "tables": {"10": 1}, "public_views": {}}


def rows_created(i):
    return {"type": "rows_created", "table_id": 10, "rows": [{"id": i}], "metadata": {}, "before_row_id": None}


@pytest.fixture(scope="module")
def local_node():
    """``tornado-rt serve --broker in-process``."""
    node = Node("L", "in-process").wait_started()
    yield node
    node.stop()


@pytest.mark.gen_test(timeout=30)
async def test_duplicate_ids_over_http_are_delivered_once_in_local_mode(local_node):
    node = local_node
    await node.put_directory(DIRECTORY)
    client = WSClient(await websocket_connect(f"{node.ws_url}?jwt_token={token(1)}"), node)
    try:
        assert (await client.recv())["type"] == "authentication"
        await client.subscribe("table", table_id=10)
        first, second = rows_created(1), rows_created(2)
        # A batch holding the same id twice, then a retry of it, then another id.
        # (delivered: a duplicate is handed to nobody, so it is not counted)
        assert await node.publish([{"message": first, "id": "http-1"}, {"message": first, "id": "http-1"}]) == {
            "published": 2, "delivered": 1}
        assert await node.publish({"message": first, "id": "http-1"}) == {"published": 1, "delivered": 0}
        assert await node.publish({"message": second, "id": "http-2"}) == {"published": 1, "delivered": 1}
        own = {"type": "group_restored", "workspace_id": 1, "workspace": {"id": 1}, "applications": []}
        assert await node.publish({"individual": {"1": own}, "id": "http-3"}) == {"published": 1, "delivered": 1}
        assert await node.publish({"individual": {"1": own}, "id": "http-3"}) == {"published": 1, "delivered": 0}
        assert await client.recv() == first
        assert await client.recv() == second
        assert await client.recv() == own
        marker = marker_message()
        await node.publish({"message": marker, "to": {"all_users": True}})
        assert await client.recv() == marker

        status, text = await node.call("GET", "/metrics")
        assert status == 200 and b"tornado_rt_duplicates_dropped_total 3.0" in text
    finally:
        client.close()


@pytest.mark.gen_test(timeout=30)
async def test_bad_ids_are_refused_with_400_naming_the_field(local_node):
    for bad in ("", "x" * 129, "has space", "é", 12, ["a"]):
        status, body = await local_node.call("POST", "/api/publish", [
            {"message": rows_created(1), "id": "fine"}, {"message": rows_created(2), "id": bad}])
        assert status == 400, (bad, status, body)
        assert body["field"] == "[1].id" and "id must be a string of 1 to 128" in body["error"], body
    status, body = await local_node.call("POST", "/api/publish", {"individual": {"1": rows_created(1)}, "id": 5})
    assert status == 400 and body["field"] == "id", body
    ok = "k" * 128
    answer = await local_node.publish({"message": rows_created(3), "id": ok})
    assert answer["published"] == 1 and set(answer) == {"published", "delivered"}, answer


@pytest.mark.gen_test
async def test_python_api_delivers_an_id_once(server, connect, barrier):
    client = await connect(user_id=1)
    await client.subscribe("table", table_id=10)
    message = rows_created(1)
    server.publish(message, id="py-1")
    server.publish(message, id="py-1")
    await server.publish_async(message, id="py-1")
    server.publish_individual({1: rows_created(2)}, id="py-2")
    server.publish_individual({1: rows_created(2)}, id="py-2")
    assert await client.recv() == message
    assert await client.recv() == rows_created(2)
    await barrier(client)
    assert server.broker.duplicates == 3


@pytest.mark.gen_test
async def test_python_api_refuses_a_bad_id(server):
    for bad in ("", "x" * 129, "tab\there", 7):
        with pytest.raises(PublishError) as refused:
            server.publish(rows_created(1), id=bad)
        assert refused.value.field == "id" and refused.value.message_type == "rows_created"
    with pytest.raises(PublishError) as refused:
        server.publish_individual({1: rows_created(1)}, id=" ")
    assert refused.value.field == "id"


@pytest.mark.rt_settings(dedup_window=0)
@pytest.mark.gen_test
async def test_a_zero_window_disables_deduplication(server, connect, barrier):
    client = await connect(user_id=1)
    await client.subscribe("table", table_id=10)
    server.publish(rows_created(1), id="same")
    server.publish(rows_created(1), id="same")
    assert await client.recv() == rows_created(1)
    assert await client.recv() == rows_created(1)
    await barrier(client)


def test_the_window_forgets_by_age_and_by_count():
    recent = RecentIds(window=10, max_ids=3)
    assert not recent.seen("a", 0)
    assert recent.seen("a", 9.9)  # within 10 s of its first delivery
    assert not recent.seen("a", 10.0)  # 10 s later: forgotten, delivered again (and remembered)
    assert recent.seen("a", 11)
    for key in ("b", "c", "d"):
        assert not recent.seen(key, 12)
    assert len(recent) == 3
    assert not recent.seen("a", 12)  # pushed out by count, the oldest first
    assert recent.seen("d", 12) and recent.seen("c", 12)
