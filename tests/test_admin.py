"""The live admin view: ``GET /api/stats/live`` against a real ``tornado-rt serve`` with real
clients, the public ``GET /admin`` page, and the rate sampler's arithmetic on a real server's
counters. (The page itself is driven in Chromium by tests/test_browser.py.)"""
import asyncio

import pytest
from tornado.websocket import websocket_connect

from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient, make_token
from tornado_rt import RealtimeServer, Settings
from tornado_rt.admin import RateSampler


@pytest.fixture(scope="module")
def serve():
    proc = ServeProcess(["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY,
                         "--log-level", "warning"])
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.mark.gen_test(timeout=20)
async def test_admin_page_is_public_html_and_its_data_needs_the_key(serve):
    api = Api(serve.base)
    status, page, response = await api.call("GET", "/admin", key=None)
    assert status == 200 and response.headers["Content-Type"].startswith("text/html")
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "sessionStorage" in page and "localStorage" not in page and "/api/stats/live" in page
    assert "<script src" not in page and "http" not in page.split("<script>")[1]  # nothing external

    status, body, response = await api.call("GET", "/api/stats/live", key=None)
    assert status == 401 and body["error"].startswith("missing or wrong API key")
    assert (await api.call("GET", "/api/stats/live", key="wrong"))[0] == 401
    assert (await api.call("POST", "/admin", key=None))[0] == 405


@pytest.mark.gen_test(timeout=30)
async def test_live_stats_follow_the_traffic(serve):
    api = Api(serve.base)
    await api.ok("PUT", "/api/directory", {"workspaces": {"1": [1, 2]}, "tables": {"10": 1, "11": 1}})
    a = await WsClient.connect(serve.ws_url, user_id=1)
    b = await WsClient.connect(serve.ws_url, user_id=2)
    anon = await WsClient.connect(serve.ws_url, token="anonymous")
    await a.subscribe("table", table_id=10)
    await b.subscribe("table", table_id=10)
    await b.subscribe("table", table_id=11)
    await a.subscribe("row", table_id=10, row_id=5)

    live = await api.ok("GET", "/api/stats/live")
    assert (live["connections"], live["authenticated_users"], live["anonymous_connections"]) == (3, 2, 1)
    assert live["subscriptions_per_page_type"] == {"row": 1, "table": 3}
    assert live["busiest_pages"][0] == {"group": "table-10", "page": "table", "parameters": {"table_id": 10},
                                        "subscribers": 2}
    assert sorted(p["group"] for p in live["busiest_pages"][1:]) == ["table-10-row-5", "table-11"]
    assert live["broker"] == {"kind": "in-process", "connected": True, "url": None}  # as /healthz
    assert live["drops"] == {"slow_consumer": 0, "ping_timeout": 0}

    # A refused token is counted by reason; a force disconnect by close reason.
    refused = await websocket_connect(f"{serve.ws_url}?jwt_token={make_token(1, secret='not-the-secret-' * 3)}")
    assert await refused.read_message() is not None
    assert await refused.read_message() is None and refused.close_code == 4001
    await api.ok("POST", "/api/disconnect", {"user_ids": [2]})
    assert await b.recv() == {"type": "force_disconnect"}
    assert await b.closed() == 4003
    live = await api.ok("GET", "/api/stats/live")
    assert {"kind": "token", "reason": "bad_signature"} in [{k: r[k] for k in ("kind", "reason")}
                                                         for r in live["refusals"]]
    assert live["closed"].get("force_disconnect") == 1
    assert live["connections"] == 2 and live["subscriptions_per_page_type"] == {"row": 1, "table": 1}

    # Messages per second: sampled once a second off the hot path; the published messages show up
    # in a later sample (3 copies delivered: a gets each one, on the table page).
    rows = {"type": "rows_created", "table_id": 10, "rows": [], "metadata": {}, "before_row_id": None}
    await api.publish([{"message": rows}] * 3)
    for _ in range(3):
        assert (await a.recv())["type"] == "rows_created"
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        rates = (await api.ok("GET", "/api/stats/live"))["rates"]
        if sum(rates["delivered"]) >= 3:
            break
        assert asyncio.get_running_loop().time() < deadline, rates
        await asyncio.sleep(0.1)  # barrier-ok: waits for the next 1 s sample, asserts nothing about time
    assert rates["interval"] == 1.0 and len(rates["times"]) == len(rates["published"]) == len(rates["delivered"])
    assert sum(rates["published"]) >= 3 and rates["times"] == sorted(rates["times"])
    for client in (a, anon):
        client.close()


def test_rate_sampler_diffs_the_counters_into_a_ring_buffer():
    server = RealtimeServer(Settings(jwt_secret="x" * 32))
    sampler = RateSampler(server, seconds=3)
    sampler.sample()  # the first sample has no earlier totals: zero
    server.counters.published["rows_created"] += 2
    server.counters.delivered["rows_created"] += 10
    sampler.sample()
    server.counters.published["field_created"] += 1
    server.counters.delivered["field_created"] += 4
    sampler.sample()
    sampler.sample()
    series = sampler.series()
    assert series["published"] == [2, 1, 0] and series["delivered"] == [10, 4, 0]  # the oldest dropped
    assert len(series["times"]) == 3 and series["interval"] == 1.0


@pytest.mark.gen_test(timeout=30)
async def test_serve_dev_prints_the_admin_address():
    proc = ServeProcess(["serve", "--dev", "--port", "0", "--log-level", "warning"])
    try:
        address = f"  Admin page (live stats; enter the API key): {proc.base}admin\n"
        assert address in proc.stdout_lines, proc.output()
        status, page, _ = await Api(proc.base).call("GET", "/admin", key=None)
        assert status == 200 and "tornado-rt admin" in page
    finally:
        assert proc.stop() == 0, proc.output()


@pytest.mark.gen_test(timeout=20)
async def test_live_stats_never_show_a_public_view_token(serve):
    # A view page's parameters carry the view's password: the busiest pages show that the page
    # has one, never its value (the admin page renders these parameters).
    api = Api(serve.base)
    secret_token = "view-password-6f1d2e"
    await api.ok("PUT", "/api/directory", {"workspaces": {}, "tables": {"70": 7},
                                           "public_views": {"locked": {"table_id": 70, "token": secret_token}}})
    anon = await WsClient.connect(serve.ws_url, token="anonymous")
    await anon.subscribe("view", slug="locked", token=secret_token)
    status, _, response = await api.call("GET", "/api/stats/live")
    assert status == 200 and secret_token not in response.body.decode("utf-8")
    live = await api.ok("GET", "/api/stats/live")
    view = [p for p in live["busiest_pages"] if p["page"] == "view"]
    assert view and view[0]["parameters"] == {"slug": "locked", "token": "[redacted]"}, live["busiest_pages"]
    anon.close()


@pytest.mark.gen_test(timeout=60)
async def test_live_stats_show_the_redis_brokers_own_counters():
    from redis_fixtures import Node, RedisProcess, require_redis_binary

    redis = RedisProcess(require_redis_binary()).start()
    node = Node("A", redis.url).wait_started()
    try:
        status, live = await node.call("GET", "/api/stats/live")
        assert status == 200, live
        broker = live["broker"]
        # counters RedisBroker really keeps (received/publish_failures were always null: gone)
        assert set(broker) == {"kind", "connected", "url", "subscriptions", "gaps", "lost", "resets",
                               "snapshots_written", "snapshot_failures"}, broker
        assert broker["kind"] == "redis" and broker["connected"] is True and broker["url"] == redis.url
        assert broker["subscriptions"] >= 1  # the stream reader's connection
        assert (broker["gaps"], broker["lost"], broker["resets"], broker["snapshot_failures"]) == (0, 0, 0, 0)
        assert isinstance(broker["snapshots_written"], int)
    finally:
        node.stop()
        redis.kill()
