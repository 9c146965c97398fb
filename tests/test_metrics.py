"""``GET /metrics``: Prometheus text from the prometheus-client library, read from the server's
counters at scrape time; the counters move when messages flow (real subprocess, real clients)."""
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.websocket import websocket_connect

from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient, clean_env, make_token
from tornado_rt import RealtimeServer, Settings
from tornado_rt.httpapi import make_app


@pytest.fixture(scope="module")
def serve():
    proc = ServeProcess(["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY,
                         "--log-level", "warning"])
    yield proc
    assert proc.stop() == 0, proc.output()


async def scrape(api):
    """{(sample name, frozenset(labels)): value} of a /metrics scrape (which must parse)."""
    status, text, response = await api.call("GET", "/metrics", key=None)
    assert status == 200, text
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, families


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.gen_test(timeout=20)
async def test_metrics_parse_and_move_when_messages_flow(serve):
    api = Api(serve.base)
    before, families = await scrape(api)
    assert families["tornado_rt_connections"] == "gauge"
    assert families["tornado_rt_messages_published"] == "counter"
    assert families["tornado_rt_messages_delivered"] == "counter"
    assert families["tornado_rt_publish_to_write_seconds"] == "histogram"
    assert families["tornado_rt_connections_closed"] == "counter"
    assert families["tornado_rt_authentication_failures"] == "counter"
    assert value(before, "tornado_rt_connections") == 0

    await api.ok("PUT", "/api/directory", {"workspaces": {"1": [1, 2]}, "tables": {"10": 1}})
    a = await WsClient.connect(serve.ws_url, user_id=1)
    b = await WsClient.connect(serve.ws_url, user_id=2)
    anon = await WsClient.connect(serve.ws_url, token="anonymous")
    await a.subscribe("table", table_id=10)
    await b.subscribe("table", table_id=10)
    rows = {"type": "rows_created", "table_id": 10, "rows": [], "metadata": {}, "before_row_id": None}
    await api.publish([{"message": rows}, {"message": rows}])
    await api.publish({"message": {"type": "group_updated", "workspace_id": 1, "workspace": {}}})
    for client in (a, b):
        for expected in ("rows_created", "rows_created", "group_updated"):
            assert (await client.recv())["type"] == expected

    refused = await websocket_connect(f"{serve.ws_url}?jwt_token={make_token(1, secret='not-the-secret-' * 3)}")
    assert (await refused.read_message()) is not None
    assert await refused.read_message() is None and refused.close_code == 4001

    await api.ok("POST", "/api/disconnect", {"user_ids": [2]})
    assert await b.recv() == {"type": "force_disconnect"}
    assert await b.closed() == 4003
    assert await api.ok("GET", "/api/stats")  # the close is processed before this answer

    after, _ = await scrape(api)
    assert value(after, "tornado_rt_connections") == 2
    assert value(after, "tornado_rt_anonymous_connections") == 1
    assert value(after, "tornado_rt_authenticated_users") == 1
    assert value(after, "tornado_rt_subscriptions") == 1
    assert value(after, "tornado_rt_pages") == 1
    assert value(after, "tornado_rt_connections_opened_total") - value(before, "tornado_rt_connections_opened_total") == 3
    for name, published, delivered in (("rows_created", 2, 4), ("group_updated", 1, 2)):
        assert (value(after, "tornado_rt_messages_published_total", type=name)
                - value(before, "tornado_rt_messages_published_total", type=name)) == published
        assert (value(after, "tornado_rt_messages_delivered_total", type=name)
                - value(before, "tornado_rt_messages_delivered_total", type=name)) == delivered
    assert (value(after, "tornado_rt_authentication_failures_total")
            - value(before, "tornado_rt_authentication_failures_total")) == 1
    assert (value(after, "tornado_rt_connections_closed_total", reason="force_disconnect")
            - value(before, "tornado_rt_connections_closed_total", reason="force_disconnect")) == 1
    # one latency observation per published envelope
    assert (value(after, "tornado_rt_publish_to_write_seconds_count")
            - value(before, "tornado_rt_publish_to_write_seconds_count")) == 3
    assert value(after, "tornado_rt_publish_to_write_seconds_bucket", le="+Inf") == \
        value(after, "tornado_rt_publish_to_write_seconds_count")
    a.close()
    anon.close()


@pytest.mark.gen_test(timeout=20)
async def test_metrics_can_be_disabled():
    proc = ServeProcess(["serve", "--port", "0", "--no-metrics"],
                        env=clean_env(TORNADO_RT_JWT_SECRET=SECRET, TORNADO_RT_API_KEYS=API_KEY))
    try:
        status, body, _ = await Api(proc.base).call("GET", "/metrics", key=None)
        assert status == 404 and body["field"] is None
        assert "/metrics" not in (await Api(proc.base).ok("GET", "/api/openapi.json"))["paths"]
    finally:
        assert await proc.stopped() == 0, proc.output()


def test_scrape_reads_counters_without_touching_the_hot_path():
    """The collector reads the server's plain counters at scrape time: bumping them (as the hot
    path does) shows up at the next scrape with nothing registered per message."""
    server = RealtimeServer(Settings(jwt_secret=SECRET, ping_interval=0), load_entry_points=False)
    app = make_app(server, [API_KEY])
    registry = app.http_api.metrics.registry
    server.counters.delivered["rows_created"] += 5
    server.counters.closed["slow_consumer"] += 1
    assert registry.get_sample_value("tornado_rt_messages_delivered_total", {"type": "rows_created"}) == 5
    assert registry.get_sample_value("tornado_rt_connections_closed_total", {"reason": "slow_consumer"}) == 1
    assert make_app(server, [API_KEY], metrics=False).http_api.metrics is None
