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


async def login(base, name):
    r = await AsyncHTTPClient().fetch(f"{base}/api/login", method="POST", body=ujson.dumps({"name": name}))
    return ujson.loads(r.body)["access_token"]


def auth(token, web_socket_id=None):
    headers = {"Authorization": f"JWT {token}"}
    if web_socket_id is not None:
        headers["WebSocketId"] = web_socket_id
    return headers


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
    token = await login(base, "alice")
    sender, sender_id = await client(http_port, token)
    other, _ = await client(http_port, await login(base, "bob"))
    http = AsyncHTTPClient()

    created = ujson.loads((await http.fetch(HTTPRequest(
        f"{base}/api/tables/1/rows", method="POST", body=ujson.dumps({"name": "a"}),
        headers=auth(token, sender_id)))).body)
    msg = ujson.loads(await other.read_message())
    assert msg["type"] == "rows_created" and msg["rows"] == [created] and msg["table_id"] == 1

    await http.fetch(HTTPRequest(f"{base}/api/tables/1/rows/{created['id']}", method="PATCH",
                                 body=ujson.dumps({"name": "b"}), headers=auth(token, sender_id)))
    msg = ujson.loads(await other.read_message())
    assert msg["type"] == "rows_updated" and msg["rows"][0]["name"] == "b"
    assert msg["rows_before_update"][0]["name"] == "a"

    # Without the header the sender receives its own change too: it is the next message it gets,
    # so the two earlier changes (sent with its WebSocketId) never reached it.
    await http.fetch(f"{base}/api/tables/1/rows/{created['id']}", method="DELETE", headers=auth(token))
    for conn in (sender, other):
        msg = ujson.loads(await conn.read_message())
        assert msg == {"type": "rows_deleted", "table_id": 1, "row_ids": [created["id"]], "rows": [msg["rows"][0]]}
    sender.close()
    other.close()


@pytest.mark.gen_test
async def test_example_plugin_dashboard_page(http_server, http_port, example):
    _, rt = example
    base = f"http://127.0.0.1:{http_port}"
    conn, _ = await client(http_port, await login(base, "alice"))
    await conn.write_message(ujson.dumps({"page": "dashboard", "dashboard_id": 1}))
    assert ujson.loads(await conn.read_message()) == {"type": "page_add", "page": "dashboard",
                                                      "parameters": {"dashboard_id": 1}}
    rt.publish({"type": "dashboard_widget_updated", "dashboard_id": 1, "widget": {"id": 3}})
    assert ujson.loads(await conn.read_message())["widget"] == {"id": 3}
    conn.close()


@pytest.mark.gen_test
async def test_rows_are_stored_and_rest_refuses_bad_input(http_server, http_port, example):
    base = f"http://127.0.0.1:{http_port}"
    http = AsyncHTTPClient()
    token = await login(base, "alice")
    for values in ({"name": "first", "status": "doing"}, {"name": "second", "notes": "n"}):
        await http.fetch(HTTPRequest(f"{base}/api/tables/1/rows", method="POST", body=ujson.dumps(values),
                                     headers=auth(token)))
    listed = ujson.loads((await http.fetch(f"{base}/api/tables/1/rows", headers=auth(token))).body)["results"]
    assert [(r["name"], r["status"], r["notes"], r["updated_by"]) for r in listed] == [
        ("first", "doing", "", "alice"), ("second", "todo", "n", "alice")]

    async def refused(method, path, body=None, headers=None):
        r = await http.fetch(f"{base}{path}", method=method, body=body, headers=headers, raise_error=False,
                             allow_nonstandard_methods=True)
        return r.code, ujson.loads(r.body)["field"]

    assert await refused("GET", "/api/tables/1/rows") == (401, "Authorization")
    assert await refused("POST", "/api/tables/1/rows", ujson.dumps({"name": "x", "colour": "red"}),
                         auth(token)) == (400, "colour")
    assert await refused("POST", "/api/tables/1/rows", ujson.dumps({"name": "x", "status": "later"}),
                         auth(token)) == (400, "status")
    assert await refused("PATCH", "/api/tables/1/rows/999", ujson.dumps({"name": "x"}), auth(token)) == (404, "row_id")
    assert await refused("POST", "/api/login", ujson.dumps({"name": ""})) == (400, "name")


@pytest.mark.gen_test
async def test_viewers_come_from_presence_and_names_from_the_app(http_server, http_port, example):
    """Who views the table is tornado-rt's presence extension (user ids); the page names them
    with the app's ``GET /api/users``. The list follows joins and leaves."""
    base = f"http://127.0.0.1:{http_port}"
    http = AsyncHTTPClient()
    alice_token = await login(base, "alice")
    alice, _ = await client(http_port, alice_token)
    bob, _ = await client(http_port, await login(base, "bob"))
    users = ujson.loads((await http.fetch(f"{base}/api/users", headers=auth(alice_token))).body)["results"]
    ids = {u["name"]: u["id"] for u in users}
    assert sorted(ids) == ["alice", "bob"]

    await alice.write_message(ujson.dumps({"presence": "table", "table_id": 1}))
    answer = ujson.loads(await alice.read_message())
    assert answer == {"type": "presence", "page": "table", "parameters": {"table_id": 1}, "anonymous": 0,
                      "users": [{"user_id": ids["alice"], "connections": 1}, {"user_id": ids["bob"], "connections": 1}]}

    carol, _ = await client(http_port, await login(base, "carol"))
    joined = ujson.loads(await alice.read_message())
    assert joined["type"] == "presence_joined"
    users = ujson.loads((await http.fetch(f"{base}/api/users", headers=auth(alice_token))).body)["results"]
    assert {u["id"]: u["name"] for u in users}[joined["user_id"]] == "carol"  # a name for the new id

    await bob.write_message(ujson.dumps({"remove_page": "table", "table_id": 1}))
    assert ujson.loads(await bob.read_message())["type"] == "page_discard"
    assert ujson.loads(await alice.read_message()) == {"type": "presence_left", "page": "table",
                                                       "parameters": {"table_id": 1}, "user_id": ids["bob"]}
    assert (await http.fetch(f"{base}/api/users", raise_error=False)).code == 401
    # The old polling list is gone: no viewers endpoint.
    assert (await http.fetch(f"{base}/api/tables/1/viewers", headers=auth(alice_token), raise_error=False)).code == 404
    for conn in (alice, bob, carol):
        conn.close()


@pytest.mark.gen_test
async def test_a_reconnecting_page_recovers_the_changes_it_missed(http_server, http_port, example):
    """The page connects with ``positions=1``: after a drop it subscribes with ``since`` and the
    rows changed through the REST API meanwhile are replayed (``recovered: true``); a position
    the server no longer knows gets ``recovered: false`` (the page then refetches)."""
    base = f"http://127.0.0.1:{http_port}"
    http = AsyncHTTPClient()
    token = await login(base, "alice")
    bob_token = await login(base, "bob")

    async def connect(subscribe):
        conn = await websocket_connect(f"ws://127.0.0.1:{http_port}/ws/core/?jwt_token={token}&positions=1")
        assert ujson.loads(await conn.read_message())["success"] is True
        await conn.write_message(ujson.dumps({"page": "table", "table_id": 1, **subscribe}))
        return conn, ujson.loads(await conn.read_message())

    page, added = await connect({})
    position = added["position"]
    page.close()  # the network drops
    missed = ujson.loads((await http.fetch(HTTPRequest(
        f"{base}/api/tables/1/rows", method="POST", body=ujson.dumps({"name": "while away"}),
        headers=auth(bob_token)))).body)

    page, added = await connect({"since": position})
    assert added["recovered"] is True
    replayed = ujson.loads(await page.read_message())
    assert replayed["type"] == "rows_created" and replayed["rows"] == [missed]
    assert replayed["position"] == {"epoch": position["epoch"], "offset": position["offset"] + 1}
    page.close()

    page, added = await connect({"since": {"epoch": "not-this-process", "offset": 1}})
    assert added["recovered"] is False
    page.close()


@pytest.mark.gen_test
async def test_page_is_plain_files_served_by_the_example_with_nothing_external(http_server, http_port, example):
    """No build step and no CDN: the page, its script and its style come from the example itself,
    and the script imports the project's client from the example's own origin."""
    base = f"http://127.0.0.1:{http_port}"
    http = AsyncHTTPClient()
    page = (await http.fetch(f"{base}/")).body.decode()
    assert '<script type="module" src="/static/app.js">' in page
    for path in ("/static/app.js", "/static/style.css"):
        text = (await http.fetch(f"{base}{path}")).body.decode()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path
    script = (await http.fetch(f"{base}/static/app.js")).body.decode()
    assert 'from "/client/tornado-rt.js"' in script
    assert "http://" not in page and "https://" not in page
