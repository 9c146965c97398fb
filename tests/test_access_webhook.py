"""The access webhook (``--access-url``): a real HTTP backend in this process decides the
subscriptions of a real ``tornado-rt serve``. It allows, denies, is slow (beyond the timeout),
fails, and is down; the cache and the concurrency bound are proven by what the backend saw."""
import asyncio
import json

import pytest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient
from tornado_rt.webhook import AccessWebhook

TYPES = """\
[[page_types]]
name = "dashboard"
parameters = ["dashboard_id"]
group = "dashboard-{dashboard_id}"
access = "webhook"

[[page_types]]
name = "lobby"
parameters = []
group = "lobby"
access = "authenticated"

[[message_types]]
name = "dashboard_widget_updated"
audience = "page"
page = "dashboard"
keys = { dashboard_id = "dashboard_id" }
payload = ["dashboard_id"]
"""

# What the backend answers, by the page's first parameter value.
ALLOW, DENY, SLOW, FAIL, GARBAGE = 1, 2, 3, 4, 5


class Backend:
    """A real HTTP backend: records every call and answers by the page parameter."""

    def __init__(self):
        self.calls = []
        self.release = asyncio.Event()  # a SLOW call is answered only once this is set
        self.in_flight = 0
        self.max_in_flight = 0
        self.reached = asyncio.Event()  # set when ``in_flight`` reaches ``wait_for``
        self.wait_for = None
        backend = self

        class Decide(RequestHandler):
            async def post(self):
                body = json.loads(self.request.body)
                backend.calls.append((body, self.request.headers.get("Authorization")))
                value = next(iter(body["parameters"].values()), ALLOW)
                backend.in_flight += 1
                backend.max_in_flight = max(backend.max_in_flight, backend.in_flight)
                if backend.wait_for is not None and backend.in_flight >= backend.wait_for:
                    backend.reached.set()
                try:
                    if value == SLOW or backend.wait_for is not None:
                        await backend.release.wait()
                finally:
                    backend.in_flight -= 1
                if value == FAIL:
                    self.set_status(500)
                    self.finish("boom")
                elif value == GARBAGE:
                    self.finish("yes please")
                else:
                    self.finish({"allow": value != DENY})

        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/decide"
        self.server = HTTPServer(Application([(r"/decide", Decide)]))
        self.server.add_sockets(sockets)

    def pages(self, page=None):
        return [(b["page"], b["parameters"]) for b, _ in self.calls if page is None or b["page"] == page]

    async def stop(self):
        self.release.set()
        self.server.stop()
        await self.server.close_all_connections()


async def refused(client, page, **params):
    await client.send({"page": page, **params})
    await client.send({"page": "lobby"})
    reply = await client.recv()
    assert reply == {"type": "page_add", "page": "lobby", "parameters": {}}, \
        f"{client.name}: {page} {params} should have been refused, got {reply}"
    await client.send({"remove_page": "lobby"})
    assert (await client.recv())["type"] == "page_discard"


@pytest.mark.gen_test(timeout=60)
async def test_the_backend_decides_through_tornado_rt_serve(tmp_path):
    backend = Backend()
    types = tmp_path / "types.toml"
    types.write_text(TYPES)
    proc = ServeProcess(["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY,
                         "--types", str(types), "--access-url", backend.url, "--access-page", "table",
                         "--access-timeout", "1", "--access-cache-ttl", "300"])
    try:
        api = Api(proc.base)
        one = await WsClient.connect(proc.ws_url, user_id=1)
        # Allowed: the backend got the user, the page, the parameters, the socket id and the key.
        await one.subscribe("dashboard", dashboard_id=ALLOW)
        assert backend.calls == [({"user_id": 1, "page": "dashboard", "parameters": {"dashboard_id": ALLOW},
                                   "web_socket_id": one.web_socket_id}, f"Bearer {API_KEY}")]
        # Denied, slow (beyond the 1 s timeout), failing and garbage: all refused.
        for value in (DENY, SLOW, FAIL, GARBAGE):
            await refused(one, "dashboard", dashboard_id=value)
        # A built-in page put behind the webhook: the directory is empty, the backend decides.
        await one.subscribe("table", table_id=ALLOW)
        await refused(one, "table", table_id=DENY)

        # Cached: a second connection of the same user subscribing again does not call the
        # backend (decisions, allow and deny alike); failures are not cached.
        two = await WsClient.connect(proc.ws_url, user_id=1, name="user 1 again")
        await two.subscribe("dashboard", dashboard_id=ALLOW)
        await refused(two, "dashboard", dashboard_id=DENY)
        assert backend.pages("dashboard").count(("dashboard", {"dashboard_id": ALLOW})) == 1
        assert backend.pages("dashboard").count(("dashboard", {"dashboard_id": DENY})) == 1
        await refused(two, "dashboard", dashboard_id=FAIL)
        assert backend.pages("dashboard").count(("dashboard", {"dashboard_id": FAIL})) == 2
        # Another user is asked separately.
        other = await WsClient.connect(proc.ws_url, user_id=2)
        await refused(other, "dashboard", dashboard_id=DENY)
        assert backend.calls[-1][0]["user_id"] == 2

        # Deliveries follow the decisions.
        update = {"type": "dashboard_widget_updated", "dashboard_id": ALLOW}
        await api.publish({"message": update})
        assert await one.recv() == update
        assert await two.recv() == update
        await api.barrier(one, two, other)

        # The backend is down: refused (a fresh page, so no cached decision answers).
        await backend.stop()
        await refused(other, "dashboard", dashboard_id=ALLOW)
        await refused(one, "table", table_id=7)

        status, metrics, _ = await api.call("GET", "/metrics", key=None)
        assert status == 200
        for outcome, n in (("allow", 2), ("deny", 3), ("timeout", 1), ("error", 5), ("cached_allow", 1),
                           ("cached_deny", 1)):
            assert f'tornado_rt_access_webhook_decisions_total{{outcome="{outcome}"}} {n}.0' in metrics, \
                (outcome, [line for line in metrics.splitlines() if "webhook" in line])
        for client in (one, two, other):
            client.close()
    finally:
        await backend.stop()
        assert await proc.stopped() == 0, proc.output()
    log = proc.stderr()
    assert "access webhook: no decision within 1 s for page 'dashboard' of user 1: refused" in log, log
    assert f"access webhook: {backend.url} answered HTTP 500 (page 'dashboard', user 1): refused" in log, log
    assert "answered a body that is not JSON" in log, log
    assert f"access webhook: cannot reach {backend.url}" in log, log
    assert "access webhook denied page 'dashboard' to user 2" in log, log
    assert f"access webhook {backend.url} decides the pages [table, dashboard]" in log, log


@pytest.mark.gen_test(timeout=30)
async def test_calls_in_flight_are_bounded_and_ttl_zero_asks_every_time():
    backend = Backend()
    webhook = AccessWebhook(backend.url, "key", timeout=10, cache_ttl=0, max_concurrency=2)
    try:
        backend.wait_for = 2
        decisions = [asyncio.ensure_future(webhook.decide(10, "dashboard", {"dashboard_id": ALLOW}, None))
                     for _ in range(5)]
        await backend.reached.wait()  # two calls are held by the backend
        assert webhook.in_flight == 2 and backend.in_flight == 2
        backend.release.set()
        assert await asyncio.gather(*decisions) == [True] * 5
        assert backend.max_in_flight == 2  # never more than max_concurrency at the backend
        assert len(backend.calls) == 5  # cache_ttl = 0: every decision asked the backend
        assert webhook.decisions["allow"] == 5 and webhook.decisions["cached_allow"] == 0
    finally:
        webhook.close()
        await backend.stop()


@pytest.mark.gen_test(timeout=30)
async def test_waiting_for_a_free_slot_counts_against_the_timeout():
    backend = Backend()
    webhook = AccessWebhook(backend.url, None, timeout=1.0, cache_ttl=60, max_concurrency=1)
    try:
        slow = asyncio.ensure_future(webhook.decide(1, "dashboard", {"dashboard_id": SLOW}))
        queued = asyncio.ensure_future(webhook.decide(1, "dashboard", {"dashboard_id": ALLOW}))
        assert await slow is False
        assert await queued is False  # its slot never came within the timeout
        assert webhook.decisions["timeout"] == 2
        assert [b["parameters"] for b, _ in backend.calls] == [{"dashboard_id": SLOW}]
        assert backend.calls[0][1] is None  # no key configured: no Authorization header
        # Timeouts are not cached: once the backend answers, the same question is allowed.
        backend.release.set()
        assert await webhook.decide(1, "dashboard", {"dashboard_id": ALLOW}) is True
        assert await webhook.decide(1, "dashboard", {"dashboard_id": ALLOW}) is True
        assert webhook.decisions["cached_allow"] == 1
    finally:
        webhook.close()
        await backend.stop()


def test_bad_webhook_settings_are_refused():
    for kwargs, text in (({"url": "ftp://x"}, "http:// or https://"), ({"timeout": 0}, "timeout"),
                         ({"cache_ttl": -1}, "cache_ttl"), ({"max_concurrency": 0}, "max_concurrency")):
        args = {"url": "http://127.0.0.1:1/", **kwargs}
        with pytest.raises(ValueError, match=text):
            AccessWebhook(args.pop("url"), **args)


@pytest.mark.gen_test(timeout=20)
async def test_a_password_in_the_webhook_url_never_reaches_the_log(caplog):
    # A port nothing listens on: the call fails, and the refusal's log line names the URL.
    sock = bind_sockets(0, "127.0.0.1")[0]
    port = sock.getsockname()[1]
    sock.close()
    password = "hunter2-webhook-pw"
    webhook = AccessWebhook(f"http://rt:{password}@127.0.0.1:{port}/decide", None, timeout=5, cache_ttl=0)
    try:
        with caplog.at_level("INFO", logger="tornado_rt"):
            assert await webhook.decide(1, "dashboard", {"dashboard_id": ALLOW}) is False
        assert webhook.decisions["error"] == 1
        log = caplog.text
        assert f"access webhook: cannot reach http://rt:***@127.0.0.1:{port}/decide" in log, log
        assert password not in log
    finally:
        webhook.close()
    with pytest.raises(ValueError) as refused:
        AccessWebhook(f"ftp://rt:{password}@127.0.0.1:{port}/")
    assert password not in str(refused.value) and "ftp://rt:***@" in str(refused.value)
