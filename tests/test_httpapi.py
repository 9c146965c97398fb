"""The HTTP server API (docs/server-api.md).

Part 1, end to end: a real ``tornado-rt serve`` subprocess, real WebSocket clients, publishes over
HTTP, and exactly who received what (non-delivery proven by a marker that must come next).
Part 2, every error status with its JSON body, against the same application assembly
(``httpapi.make_app``) served in-process.
"""
import json

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient
from tornado_rt import Broker, BrokerUnavailable, RealtimeServer, Settings
from tornado_rt.httpapi import make_app

DIRECTORY = {
    "workspaces": {"1": [1, 2, 3], "2": [4]},
    "tables": {"10": 1, "11": 1, "20": 2},
    "public_views": {"pub": {"table_id": 10, "token": None}},
}


def rows_created(table_id, n=1):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": n}], "metadata": {},
            "before_row_id": None}


# ======================================================================================================
# Part 1: end to end against a `tornado-rt serve` subprocess
# ======================================================================================================

@pytest.fixture(scope="module")
def serve():
    proc = ServeProcess(["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY,
                         "--log-level", "warning"])
    yield proc
    code = proc.stop()
    assert code == 0, proc.output()


@pytest.fixture
def api(serve, io_loop):
    return Api(serve.base)


@pytest.fixture
def connect(serve, io_loop):
    opened = []

    async def _connect(user_id=1, token=None, name=None):
        client = await WsClient.connect(serve.ws_url, token=token, user_id=user_id, name=name)
        opened.append(client)
        return client

    yield _connect
    for client in opened:
        client.close()


@pytest.fixture
def directory(api):
    async def _load(snapshot=DIRECTORY):
        assert await api.ok("PUT", "/api/directory", snapshot) == {
            "workspaces": len(snapshot.get("workspaces", {})), "tables": len(snapshot.get("tables", {})),
            "public_views": len(snapshot.get("public_views", {}))}
    return _load


async def expect(message, recipients):
    for client in recipients:
        got = await client.recv()
        assert got == message, f"{client.name} got {got}, expected {message}"


@pytest.mark.gen_test(timeout=20)
async def test_healthz_needs_no_key_and_directory_round_trips(serve, api, directory):
    assert await api.ok("GET", "/healthz", key=None) == {"status": "ok", "broker": {"kind": "in-process", "connected": True}}
    await directory()
    assert await api.ok("GET", "/api/directory") == {
        "workspaces": {"1": [1, 2, 3], "2": [4]},
        "tables": {"10": 1, "11": 1, "20": 2},
        "public_views": {"pub": {"table_id": 10, "token": None}},
    }


@pytest.mark.gen_test(timeout=20)
async def test_publish_one_of_each_audience_kind(api, connect, directory):
    await directory()
    a = await connect(1)
    b = await connect(2)
    c = await connect(4)
    anon = await connect(token="anonymous", name="anonymous")
    x = await connect(9)
    everyone = [a, b, c, anon, x]
    await a.subscribe("table", table_id=10)
    await a.subscribe("row", table_id=10, row_id=5)
    await c.subscribe("table", table_id=20)
    await anon.subscribe("view", slug="pub")

    cases = [
        # default audience: page table (table_id)
        ({"message": rows_created(10)}, [a]),
        # default audience: page row (table_id, row_id)
        ({"message": {"type": "row_history_updated", "row_history_entry": {}, "table_id": 10, "row_id": 5}}, [a]),
        # explicit page
        ({"message": {"type": "force_view_refresh", "view_id": 3}, "to": {"page": "view", "slug": "pub"}}, [anon]),
        # default audience: workspace (workspace_id), only connected members
        ({"message": {"type": "group_updated", "workspace_id": 1, "workspace": {"id": 1}}}, [a, b]),
        # explicit workspace_id
        ({"message": {"type": "application_deleted", "application_id": 7}, "to": {"workspace_id": 2}}, [c]),
        # explicit workspace_ids
        ({"message": {"type": "application_deleted", "application_id": 8}, "to": {"workspace_ids": [1, 2]}},
         [a, b, c]),
        # explicit user_ids (ids as numbers or strings)
        ({"message": {"type": "notifications_created", "notifications": []}, "to": {"user_ids": [9, "2"]}},
         [b, x]),
        # all_users, anonymous included
        ({"message": {"type": "all_notifications_cleared"}, "to": {"all_users": True}}, everyone),
        # exclude_user_ids on a workspace audience
        ({"message": {"type": "group_updated", "workspace_id": 1, "workspace": {"id": 1}},
          "exclude_user_ids": [1]}, [b]),
    ]
    for envelope, recipients in cases:
        assert await api.publish(envelope) == {"published": 1, "delivered": len(recipients)}
        await expect(envelope["message"], recipients)
        await api.barrier(*everyone)


@pytest.mark.gen_test(timeout=20)
async def test_batch_is_processed_in_order(api, connect, directory):
    await directory()
    a = await connect(1)
    c = await connect(4)
    await a.subscribe("table", table_id=10)
    first, second, third = rows_created(10, 1), rows_created(10, 2), rows_created(10, 3)
    batch = [
        {"message": first},
        {"message": {"type": "application_deleted", "application_id": 1}, "to": {"user_ids": [4]}},
        {"message": second},
        {"message": third},
    ]
    assert await api.publish(batch) == {"published": 4, "delivered": 4}  # a: 3, c: 1
    await expect(first, [a])
    await expect(second, [a])
    await expect(third, [a])
    await expect(batch[1]["message"], [c])
    await api.barrier(a, c)
    assert await api.publish([]) == {"published": 0, "delivered": 0}
    await api.barrier(a, c)


@pytest.mark.gen_test(timeout=20)
async def test_individual_payloads(api, connect, directory):
    await directory()
    a = await connect(1)
    b = await connect(2)
    c = await connect(4)
    own_1 = {"type": "application_created", "application": {"id": 5, "name": "for one"}}
    own_4 = {"type": "application_created", "application": {"id": 5, "name": "for four"}}
    assert await api.publish({"individual": {"1": own_1, "4": own_4}}) == {"published": 1, "delivered": 2}
    await expect(own_1, [a])
    await expect(own_4, [c])
    await api.barrier(a, b, c)


@pytest.mark.gen_test(timeout=20)
async def test_web_socket_id_header_is_the_default_ignore(api, connect, directory):
    await directory()
    sender = await connect(1, name="sender")
    other_tab = await connect(1, name="other tab of the sender")
    for client in (sender, other_tab):
        await client.subscribe("table", table_id=10)
    header = {"WebSocketId": sender.web_socket_id}

    msg = rows_created(10, 1)
    await api.publish({"message": msg}, headers=header)
    await expect(msg, [other_tab])
    await api.barrier(sender, other_tab)

    # an explicit null in the body overrides the header: nobody is skipped
    msg = rows_created(10, 2)
    await api.publish({"message": msg, "ignore_web_socket_id": None}, headers=header)
    await expect(msg, [sender, other_tab])
    await api.barrier(sender, other_tab)

    # an explicit id in the body wins over the header
    msg = rows_created(10, 3)
    await api.publish({"message": msg, "ignore_web_socket_id": other_tab.web_socket_id}, headers=header)
    await expect(msg, [sender])
    await api.barrier(sender, other_tab)

    # individual payloads and batches honour the header too
    own = {"type": "user_data_updated", "user_data": {"n": 1}}
    await api.publish([{"individual": {"1": own}}, {"message": rows_created(10, 4)}], headers=header)
    await expect(own, [other_tab])
    await expect(rows_created(10, 4), [other_tab])
    await api.barrier(sender, other_tab)


@pytest.mark.gen_test(timeout=20)
async def test_one_bad_envelope_rejects_the_whole_batch(api, connect, directory):
    await directory()
    a = await connect(1)
    await a.subscribe("table", table_id=10)
    status, body, _ = await api.call("POST", "/api/publish", [
        {"message": rows_created(10, 1)},
        {"message": rows_created(10, 2)},
        {"message": {"type": "no_such_type"}},
    ])
    assert status == 400
    assert body["field"] == "[2].message.type" and "no_such_type" in body["error"]
    status, body, _ = await api.call("POST", "/api/publish", [
        {"message": rows_created(10, 1)},
        {"message": {"type": "rows_created", "rows": []}},
    ])
    assert status == 400 and body["field"] == "[1].message.table_id", body
    await api.barrier(a)  # neither of the valid envelopes was published


@pytest.mark.gen_test(timeout=20)
async def test_disconnect_over_http(api, connect, directory):
    await directory()
    b1 = await connect(2, name="b1")
    b2 = await connect(2, name="b2")
    d1 = await connect(3, name="d1")
    d2 = await connect(3, name="d2")
    c = await connect(4)
    assert await api.ok("POST", "/api/disconnect",
                        {"user_ids": [2], "ignore_web_socket_ids": [b2.web_socket_id]}) == {"disconnected": 1}
    assert await b1.recv() == {"type": "force_disconnect"}
    assert await b1.closed() == 4003
    # the WebSocketId header spares the caller's own connection by default
    assert await api.ok("POST", "/api/disconnect", {"user_ids": ["3"]},
                        headers={"WebSocketId": d2.web_socket_id}) == {"disconnected": 1}
    assert await d1.recv() == {"type": "force_disconnect"}
    assert await d1.closed() == 4003
    await api.barrier(b2, d2, c)
    assert await api.ok("POST", "/api/disconnect", {"user_ids": [77]}) == {"disconnected": 0}


@pytest.mark.gen_test(timeout=20)
async def test_revoke_over_http(api, connect, directory):
    await directory()
    a = await connect(1)
    b = await connect(2)
    await a.subscribe("table", table_id=10)
    await a.subscribe("row", table_id=10, row_id=5)
    await a.subscribe("table", table_id=11)
    await b.subscribe("table", table_id=10)
    assert await api.ok("POST", "/api/revoke", {"user_ids": [1], "permission_group": "permissions-table-10"}) == {
        "discarded": 2}
    discarded = [await a.recv(), await a.recv()]
    assert sorted(discarded, key=lambda m: m["page"]) == [
        {"type": "page_discard", "page": "row", "parameters": {"table_id": 10, "row_id": 5}},
        {"type": "page_discard", "page": "table", "parameters": {"table_id": 10}},
    ]
    await api.publish({"message": rows_created(10)})
    await expect(rows_created(10), [b])
    await api.publish({"message": rows_created(11)})
    await expect(rows_created(11), [a])
    await api.barrier(a, b)


@pytest.mark.gen_test(timeout=20)
async def test_published_events_keep_the_directory_current(api, connect, directory):
    await directory()
    a = await connect(1)
    newcomer = await connect(9, name="newcomer")
    added = {"type": "group_user_added", "id": 1, "workspace_id": 1, "workspace_user": {"user_id": 9}}
    await api.publish({"message": added})
    await expect(added, [a, newcomer])  # the new member is included
    assert 9 in (await api.ok("GET", "/api/directory"))["workspaces"]["1"]
    await newcomer.subscribe("table", table_id=10)
    removed = {"type": "group_user_deleted", "id": 1, "workspace_id": 1, "workspace_user": {"user_id": 9}}
    await api.publish({"message": removed})
    await expect(removed, [a, newcomer])
    assert await newcomer.recv() == {"type": "page_discard", "page": "table", "parameters": {"table_id": 10}}
    assert 9 not in (await api.ok("GET", "/api/directory"))["workspaces"]["1"]
    await api.barrier(a, newcomer)


@pytest.mark.gen_test(timeout=20)
async def test_incremental_directory_endpoints(api, connect, directory):
    await directory({"workspaces": {}, "tables": {}, "public_views": {}})
    user = await connect(8)
    anon = await connect(token="anonymous", name="anonymous")
    assert await api.ok("PUT", "/api/directory/workspaces/5", {"members": [7]}) == {"ok": True}
    assert await api.ok("PUT", "/api/directory/workspaces/5/members/8") == {"ok": True}
    assert await api.ok("PUT", "/api/directory/tables/50", {"workspace_id": 5}) == {"ok": True}
    assert await api.ok("PUT", "/api/directory/public_views/s2", {"table_id": 50, "token": "pw"}) == {"ok": True}
    assert await api.ok("GET", "/api/directory") == {
        "workspaces": {"5": [7, 8]}, "tables": {"50": 5},
        "public_views": {"s2": {"table_id": 50, "token": "pw"}}}
    await user.subscribe("table", table_id=50)
    await anon.subscribe("view", slug="s2", token="pw")

    assert await api.ok("DELETE", "/api/directory/workspaces/5/members/8") == {"ok": True}
    await user.send({"page": "table", "table_id": 50})  # no longer allowed: no reply at all
    await api.barrier(user, anon)
    assert await api.ok("DELETE", "/api/directory/public_views/s2") == {"ok": True}
    assert await api.ok("DELETE", "/api/directory/tables/50") == {"ok": True}
    assert (await api.ok("GET", "/api/directory"))["tables"] == {}
    assert await api.ok("DELETE", "/api/directory/workspaces/5") == {"ok": True}
    assert await api.ok("GET", "/api/directory") == {"workspaces": {}, "tables": {}, "public_views": {}}


@pytest.mark.gen_test(timeout=20)
async def test_stats_count_published_messages(api, connect, directory):
    await directory()
    a = await connect(1)
    await a.subscribe("table", table_id=10)
    before = await api.ok("GET", "/api/stats")
    assert set(before) == {"connections", "authenticated_users", "anonymous_connections", "pages",
                           "subscriptions", "messages_published", "messages_delivered"}
    assert before["connections"] >= 1 and before["subscriptions"] >= 1
    await api.publish([{"message": rows_created(10, 1)}, {"message": rows_created(10, 2)}])
    await expect(rows_created(10, 1), [a])
    await expect(rows_created(10, 2), [a])
    after = await api.ok("GET", "/api/stats")
    assert after["messages_published"] == before["messages_published"] + 2
    assert after["messages_delivered"] == before["messages_delivered"] + 2


# ======================================================================================================
# Part 2: every error status, in-process (the same make_app the command line serves)
# ======================================================================================================

LIMIT = 256 * 1024
OTHER_KEY = "second-key-abcdefghijklmnop"


@pytest.fixture
def rt_server():
    return RealtimeServer(Settings(jwt_secret=SECRET, ping_interval=0), load_entry_points=False)


@pytest.fixture
def app(rt_server):
    return make_app(rt_server, [API_KEY, OTHER_KEY], max_body_size=LIMIT)


@pytest.fixture
def local_api(http_server, base_url):
    return Api(base_url)


def assert_error(status, body, expected_status, field=None):
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error", "field"}, body
    assert isinstance(body["error"], str) and body["error"], body
    assert body["field"] == field, body


def api_operations(app):
    """(method, concrete path) of every documented operation under /api/ that needs the key (the
    descriptions, documented with ``security: []``, are public: test_openapi checks that)."""
    for template, item in app.openapi["paths"].items():
        if not template.startswith("/api/"):
            continue
        path = template.replace("{", "").replace("}", "")
        for method in item:
            if method != "parameters" and item[method].get("security") != []:
                yield method.upper(), path


@pytest.mark.gen_test
async def test_401_without_or_with_a_wrong_key_on_every_api_endpoint(app, local_api):
    operations = list(api_operations(app))
    assert len(operations) >= 13
    for method, path in operations:
        for key in (None, "wrong-key", API_KEY + "x", ""):
            status, body, response = await local_api.call(method, path, {"user_ids": [1]}, key=key)
            assert_error(status, body, 401)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    status, body, _ = await local_api.call("GET", "/api/stats", key=None,
                                           headers={"Authorization": f"Basic {API_KEY}"})
    assert_error(status, body, 401)
    for key in (API_KEY, OTHER_KEY):
        status, body, _ = await local_api.call("GET", "/api/stats", key=key)
        assert status == 200 and body["connections"] == 0


OK_MESSAGE = rows_created(10)

BAD_REQUESTS = [
    # (path, method, raw body or JSON-able body, expected field)
    ("/api/publish", "POST", b"{", None),
    ("/api/publish", "POST", b"", None),
    ("/api/publish", "POST", b"\xff\xfe{}", None),
    ("/api/publish", "POST", b'{"message": NaN}', None),
    ("/api/publish", "POST", b"[" * 100000 + b"]" * 100000, None),
    ("/api/publish", "POST", "just a string", None),
    ("/api/publish", "POST", [1], "[0]"),
    ("/api/publish", "POST", {"to": {"all_users": True}}, "message"),
    ("/api/publish", "POST", {"message": "rows_created"}, "message"),
    ("/api/publish", "POST", {"message": {"type": "no_such_type"}}, "message.type"),
    ("/api/publish", "POST", {"message": {"table_id": 1}}, "message.type"),
    ("/api/publish", "POST", {"message": {"type": "authentication"}}, "message.type"),
    ("/api/publish", "POST", {"message": {"type": "rows_created", "rows": []}}, "message.table_id"),
    ("/api/publish", "POST", {"message": {"type": "application_deleted", "application_id": 1}}, "to"),
    ("/api/publish", "POST", {"message": OK_MESSAGE, "to": {"page": "no_such_page"}}, "to.page"),
    ("/api/publish", "POST", {"message": OK_MESSAGE, "to": {"page": "table"}}, "to.table_id"),
    ("/api/publish", "POST", {"message": OK_MESSAGE, "to": {}}, "to"),
    ("/api/publish", "POST", {"message": OK_MESSAGE, "to": {"workspace_id": [1]}}, "to.workspace_id"),
    ("/api/publish", "POST", {"message": OK_MESSAGE, "to": {"user_ids": 5}}, "to.user_ids"),
    ("/api/publish", "POST", {"message": OK_MESSAGE, "to": {"user_ids": [1, None]}}, "to.user_ids[1]"),
    ("/api/publish", "POST", {"message": OK_MESSAGE, "to": {"all_users": 1}}, "to.all_users"),
    ("/api/publish", "POST", {"message": OK_MESSAGE, "exclude_user_ids": "12"}, "exclude_user_ids"),
    ("/api/publish", "POST", {"message": OK_MESSAGE, "exclude_user_ids": [1.5]}, "exclude_user_ids[0]"),
    ("/api/publish", "POST", {"message": OK_MESSAGE, "ignore_web_socket_id": 5}, "ignore_web_socket_id"),
    ("/api/publish", "POST", {"message": OK_MESSAGE, "surprise": 1}, "surprise"),
    ("/api/publish", "POST", {"individual": {}}, "individual"),
    ("/api/publish", "POST", {"individual": {"1": {"type": "no_such_type"}}}, "individual.1.type"),
    ("/api/publish", "POST", {"individual": {"1": OK_MESSAGE}, "message": OK_MESSAGE}, "message"),
    ("/api/publish", "POST", [{"message": OK_MESSAGE}, {"message": OK_MESSAGE},
                              {"message": {"type": "no_such_type"}}], "[2].message.type"),
    ("/api/publish", "POST", [{"message": OK_MESSAGE}, {"message": OK_MESSAGE, "to": {"user_ids": 1}}],
     "[1].to.user_ids"),
    ("/api/publish", "POST", [{"message": OK_MESSAGE}, "nope"], "[1]"),
    ("/api/disconnect", "POST", {}, "user_ids"),
    ("/api/disconnect", "POST", [], None),
    ("/api/disconnect", "POST", {"user_ids": "1"}, "user_ids"),
    ("/api/disconnect", "POST", {"user_ids": [1, None]}, "user_ids[1]"),
    ("/api/disconnect", "POST", {"user_ids": [1], "ignore_web_socket_ids": [1]}, "ignore_web_socket_ids"),
    ("/api/disconnect", "POST", {"user_ids": [1], "other": 1}, "other"),
    ("/api/revoke", "POST", {"user_ids": [1]}, "permission_group"),
    ("/api/revoke", "POST", {"user_ids": [1], "permission_group": ""}, "permission_group"),
    ("/api/revoke", "POST", {"user_ids": 1, "permission_group": "permissions-table-1"}, "user_ids"),
    ("/api/directory", "PUT", [], None),
    ("/api/directory", "PUT", {"nope": {}}, "nope"),
    ("/api/directory", "PUT", {"workspaces": {"1": "x"}}, "workspaces.1"),
    ("/api/directory", "PUT", {"workspaces": {"1": [1]}, "tables": {"7": None}}, "tables.7"),
    ("/api/directory", "PUT", {"public_views": {"s": {"table_id": 1, "token": 5}}}, "public_views.s.token"),
    ("/api/directory/workspaces/1", "PUT", {"members": [None]}, "members[0]"),
    ("/api/directory/workspaces/1", "PUT", {}, "members"),
    ("/api/directory/tables/1", "PUT", {"workspace_id": None}, "workspace_id"),
    ("/api/directory/public_views/s", "PUT", {"token": 5}, "token"),
    ("/api/directory/public_views/s", "PUT", {"table_id": [1]}, "table_id"),
]


@pytest.mark.gen_test
@pytest.mark.parametrize("path,method,body,field", BAD_REQUESTS)
async def test_400_names_the_field(local_api, rt_server, path, method, body, field):
    rt_server.directory.load({"workspaces": {"1": [1]}, "tables": {"10": 1}})
    before = rt_server.directory.snapshot()
    if isinstance(body, bytes):
        status, parsed, _ = await local_api.call(method, path, raw=body)
    else:
        status, parsed, _ = await local_api.call(method, path, body)
    assert_error(status, parsed, 400, field)
    assert rt_server.directory.snapshot() == before  # a rejected request changes nothing
    assert rt_server.stats()["messages_published"] == 0


@pytest.mark.gen_test
async def test_404_for_unknown_paths(local_api):
    for path, key in (("/api/nope", "default"), ("/api/nope", None), ("/nope", None), ("/", None),
                      ("/api/directory/workspaces/1/oops", "default")):
        status, body, _ = await local_api.call("GET", path, key=key)
        assert_error(status, body, 404)
    status, body, _ = await local_api.call("POST", "/api/publishh", {"message": OK_MESSAGE})
    assert_error(status, body, 404)


@pytest.mark.gen_test
async def test_405_for_a_wrong_method(local_api):
    for method, path, allowed in (
        ("GET", "/api/publish", "POST"), ("PUT", "/api/disconnect", "POST"), ("GET", "/api/revoke", "POST"),
        ("POST", "/api/directory", "GET, PUT"), ("DELETE", "/api/stats", "GET"),
        ("POST", "/api/directory/tables/1", "PUT, DELETE"), ("POST", "/healthz", "GET"),
        ("DELETE", "/metrics", "GET"), ("PATCH", "/api/openapi.json", "GET"),
    ):
        status, body, response = await local_api.call(method, path, {})
        assert_error(status, body, 405)
        assert response.headers["Allow"] == allowed, (method, path)


@pytest.mark.gen_test
async def test_413_for_a_body_over_the_limit(local_api, base_url, rt_server):
    envelope = json.dumps({"message": OK_MESSAGE, "to": {"all_users": True}})
    at_limit = envelope + " " * (LIMIT - len(envelope))
    status, body, _ = await local_api.call("POST", "/api/publish", raw=at_limit)
    assert status == 200 and body == {"published": 1, "delivered": 0}  # nobody connected
    status, body, _ = await local_api.call("POST", "/api/publish", raw=at_limit + " ")
    assert_error(status, body, 413)
    status, body, _ = await local_api.call("PUT", "/api/directory", raw=b"x" * (LIMIT * 4))
    assert_error(status, body, 413)

    async def chunked(write):  # no Content-Length: the limit is enforced while reading
        for _ in range(LIMIT // 1024 + 2):
            await write(b" " * 1024)

    request = HTTPRequest(base_url + "/api/publish", method="POST", body_producer=chunked,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    assert_error(response.code, json.loads(response.body), 413)
    assert rt_server.stats()["messages_published"] == 1


@pytest.mark.gen_test
async def test_415_when_the_body_is_not_json(local_api):
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"):
        status, body, _ = await local_api.call("POST", "/api/publish", raw=json.dumps({"message": OK_MESSAGE}),
                                               content_type=content_type)
        assert_error(status, body, 415)
    status, body, _ = await local_api.call("PUT", "/api/directory", raw="{}", content_type="text/json")
    assert_error(status, body, 415)
    status, body, _ = await local_api.call("POST", "/api/publish", {"message": OK_MESSAGE, "to": {"all_users": True}},
                                           content_type="application/json; charset=utf-8")
    assert status == 200


class DownBroker(Broker):
    """A broker whose bus is down (a stand-in for Redis being unreachable)."""

    def publish(self, envelope):
        raise BrokerUnavailable("the bus is down")


@pytest.mark.gen_test
async def test_503_when_the_broker_cannot_take_the_publish(io_loop):
    server = RealtimeServer(Settings(jwt_secret=SECRET, ping_interval=0), broker=DownBroker(),
                            load_entry_points=False)
    sockets = bind_sockets(0, "127.0.0.1")
    http_server = HTTPServer(make_app(server, [API_KEY]))
    http_server.add_sockets(sockets)
    try:
        api = Api(f"http://127.0.0.1:{sockets[0].getsockname()[1]}/")
        status, body, _ = await api.call("POST", "/api/publish", {"message": OK_MESSAGE})
        assert_error(status, body, 503)
        assert "down" in body["error"]
        assert await api.ok("GET", "/healthz") == {  # the process is fine: a broker refusing one publish
            "status": "ok", "broker": {"kind": "DownBroker", "connected": True}}  # is not "unreachable"
    finally:
        http_server.stop()


@pytest.mark.gen_test
async def test_the_process_survives_bad_input(local_api):
    """Garbage of every kind gets a 400; afterwards a normal publish still works."""
    for raw in (b"\x00" * 100,
                b'{"message": {"type": "rows_created", "table_id": ' + b"9" * 5000 + b"}}",
                b'{"message": {"type": "rows_created", "table_id": 1e999}}',
                b'{"individual": {"' + b"x" * 300 + b'": {"type": "user_data_updated"}}}',
                b'{"message": {"type": "rows_created", "table_id": 1, "rows": [], "metadata": {}, '
                b'"before_row_id": null}, "to": {"page": "table", "table_id": {"a": 1}}}'):
        status, body, _ = await local_api.call("POST", "/api/publish", raw=raw)
        assert status == 400, (raw[:60], body)
    assert await local_api.publish({"message": OK_MESSAGE, "to": {"all_users": True}}) == {"published": 1,
                                                                                               "delivered": 0}
    assert await local_api.ok("GET", "/healthz", key=None) == {"status": "ok", "broker": {"kind": "in-process", "connected": True}}
