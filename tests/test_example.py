"""The example app (examples/app.py) over real HTTP and WebSocket connections."""
import importlib.util
import pathlib

import pytest
import ujson
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "app.py"
SECRET = "example-test-secret-long-enough-for-hs256"


def load_example():
    spec = importlib.util.spec_from_file_location("example_app", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example():
    return load_example().make_app(SECRET)


@pytest.fixture
def app(example):
    return example[0]


async def login(base, user_id):
    r = await AsyncHTTPClient().fetch(f"{base}/api/login", method="POST", body=ujson.dumps({"user_id": user_id}))
    return ujson.loads(r.body)["access_token"]


async def client(port, token):
    conn = await websocket_connect(f"ws://127.0.0.1:{port}/ws/core/?jwt_token={token}")
    auth = ujson.loads(await conn.read_message())
    assert auth["success"] is True
    await conn.write_message(ujson.dumps({"page": "table", "table_id": 1}))
    assert ujson.loads(await conn.read_message())["type"] == "page_add"
    return conn, auth["web_socket_id"]


@pytest.mark.gen_test
async def test_rest_changes_reach_other_clients_but_not_the_sender(http_server, http_port, example):
    base = f"http://127.0.0.1:{http_port}"
    sender, sender_id = await client(http_port, await login(base, 1))
    other, _ = await client(http_port, await login(base, 2))
    http = AsyncHTTPClient()

    created = ujson.loads((await http.fetch(HTTPRequest(
        f"{base}/api/tables/1/rows", method="POST", body=ujson.dumps({"name": "a"}),
        headers={"WebSocketId": sender_id}))).body)
    msg = ujson.loads(await other.read_message())
    assert msg["type"] == "rows_created" and msg["rows"] == [created] and msg["table_id"] == 1

    await http.fetch(HTTPRequest(f"{base}/api/tables/1/rows/{created['id']}", method="PATCH",
                                 body=ujson.dumps({"name": "b"}), headers={"WebSocketId": sender_id}))
    msg = ujson.loads(await other.read_message())
    assert msg["type"] == "rows_updated" and msg["rows"][0]["name"] == "b"
    assert msg["rows_before_update"][0]["name"] == "a"

    # Without the header the sender receives its own change too: it is the next message it gets,
    # so the two earlier changes (sent with its WebSocketId) never reached it.
    await http.fetch(f"{base}/api/tables/1/rows/{created['id']}", method="DELETE")
    for conn in (sender, other):
        msg = ujson.loads(await conn.read_message())
        assert msg == {"type": "rows_deleted", "table_id": 1, "row_ids": [created["id"]], "rows": [msg["rows"][0]]}
    sender.close()
    other.close()


@pytest.mark.gen_test
async def test_example_plugin_dashboard_page(http_server, http_port, example):
    _, rt = example
    base = f"http://127.0.0.1:{http_port}"
    conn, _ = await client(http_port, await login(base, 1))
    await conn.write_message(ujson.dumps({"page": "dashboard", "dashboard_id": 1}))
    assert ujson.loads(await conn.read_message()) == {"type": "page_add", "page": "dashboard",
                                                      "parameters": {"dashboard_id": 1}}
    rt.publish({"type": "dashboard_widget_updated", "dashboard_id": 1, "widget": {"id": 3}})
    assert ujson.loads(await conn.read_message())["widget"] == {"id": 3}
    conn.close()
