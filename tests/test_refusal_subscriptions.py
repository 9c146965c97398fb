"""Refused subscriptions and ignored frames are visible to the operator (docs/protocol.md,
"Refusals in the operator's view"), and, with the ``error_frames`` setting, to the client
("Extensions"). Over real sockets: each reason gives one log line on ``tornado_rt.refusals`` (INFO
for a subscription, with the page, the parameters made safe and the user; DEBUG for a frame), a
count in ``tornado_rt_refusals_total{kind, reason}`` on a real ``/metrics`` scrape, never a public
view's token; a flood of refusals cannot flood the log; with error frames off nothing reaches the
client (barrier), with them on the error frame names the code."""
import logging

import pytest
import ujson
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

import tornado_rt.refusals as refusals_module
from conftest import make_token
from standalone import API_KEY, Api
from tornado_rt import AccessWebhook, PageType, Plugin, closecodes
from tornado_rt.httpapi import make_app
from tornado_rt.refusals import FRAME_REASONS, SUBSCRIPTION_REASONS, Refusals


def _broken(principal, params, policy):
    raise RuntimeError("the access backend is down")


CHECKS = Plugin("refusal-checks", page_types=[
    PageType("denied", ("id",), "denied-{id}", lambda principal, params, policy: False),
    PageType("broken", ("id",), "broken-{id}", _broken),
])

pytestmark = pytest.mark.rt_server(plugins=[CHECKS])


@pytest.fixture
def app(server):
    return make_app(server, [API_KEY])


class FrozenClock:
    """The refusals' clock, stopped: every line falls in one rate-limit window until moved."""

    def __init__(self):
        self.now = 5000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FrozenClock()


@pytest.fixture
def fresh_refusals(monkeypatch, clock):
    """A fresh process-wide Refusals on a stopped clock: counts start at zero, and the one
    window's line budget (20 in all, 5 per connection) is this test's alone."""
    fresh = Refusals(clock=clock)
    monkeypatch.setattr(refusals_module, "REFUSALS", fresh)
    return fresh


@pytest.fixture
def refusal_log(caplog):
    caplog.set_level(logging.DEBUG, logger="tornado_rt.refusals")
    return caplog


def lines(caplog, prefix="refused "):
    return [r for r in caplog.records if r.name == "tornado_rt.refusals" and r.getMessage().startswith(prefix)]


async def refusals_on_metrics(base_url, kind):
    """{reason: value} of tornado_rt_refusals_total{kind=kind} from a real /metrics scrape."""
    status, text, _ = await Api(base_url).call("GET", "/metrics", key=None)
    assert status == 200, text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tornado_rt_refusals_total" and sample.labels.get("kind") == kind:
                found[sample.labels["reason"]] = sample.value
    return found


LONG = "x" * 10_000
WRONG_TOKEN = "wrong-view-password-4711"

# case -> (user id or None for anonymous, raw frame, reason, fragments the log line must hold)
SUBSCRIPTION_CASES = {
    "unknown_page_type": (1, {"page": "no_such_page", "table_id": 3}, "unknown_page_type",
                          ["page='no_such_page'", "parameters={'table_id': 3}", "user_id=1"]),
    "missing_parameter": (1, {"page": "table"}, "missing_parameter",
                          ["page='table'", "parameters={'table_id': None}", "parameter='table_id'"]),
    "invalid_parameter": (1, '{"page": "table", "table_id": 1e999}', "invalid_parameter", ["page='table'"]),
    "anonymous_not_allowed": (None, {"page": "table", "table_id": 10}, "anonymous_not_allowed",
                              ["page='table'", "parameters={'table_id': 10}", "user_id=None"]),
    "unknown_table": (1, {"page": "table", "table_id": 99}, "unknown_table",
                      ["page='table'", "parameters={'table_id': 99}", "user_id=1"]),
    "unknown_table_row": (1, {"page": "row", "table_id": 98, "row_id": 1}, "unknown_table",
                          ["page='row'", "parameters={'table_id': 98, 'row_id': 1}"]),
    "not_a_member": (1, {"page": "table", "table_id": 20}, "not_a_member",
                     ["page='table'", "parameters={'table_id': 20}", "user_id=1"]),
    "unknown_view": (None, {"page": "view", "slug": "no-such-view"}, "unknown_view",
                     ["page='view'", "parameters={'slug': 'no-such-view', 'token': None}"]),
    "bad_token": (2, {"page": "view", "slug": "secret-view", "token": WRONG_TOKEN}, "bad_token",
                  ["page='view'", "parameters={'slug': 'secret-view', 'token': '[redacted]'}", "user_id=2"]),
    "access_denied": (1, {"page": "denied", "id": 1}, "access_denied", ["page='denied'", "parameters={'id': 1}"]),
    "access_error": (1, {"page": "broken", "id": 1}, "access_error", ["page='broken'"]),
    # access_token names a credential (redaction.CREDENTIAL_ARGUMENTS): its value never logged
    "credential_parameter": (1, {"page": "no_such_page", "access_token": WRONG_TOKEN, "jwt": WRONG_TOKEN},
                             "unknown_page_type",
                             ["parameters={'access_token': '[redacted]', 'jwt': '[redacted]'}", "user_id=1"]),
    "long_value": (3, {"page": "table", "table_id": LONG}, "invalid_parameter",
                   ["parameters={'table_id': '" + "x" * 64 + "...(10000 chars)'}", "user_id=3"]),
}


async def answered_next(client):
    """Subscribe to a page anyone may see and assert that its ``page_add`` is the very next
    message: the server handles a connection's frames in order, so whatever it answered to the
    frames sent before (nothing, with error frames off) arrived first."""
    await client.send({"page": "view", "slug": "pub"})
    assert await client.recv() == {"type": "page_add", "page": "view", "parameters": {"slug": "pub", "token": None}}


async def open_client(connect, user_id):
    return await connect(token="anonymous") if user_id is None else await connect(user_id=user_id)


@pytest.mark.parametrize("case", sorted(SUBSCRIPTION_CASES))
@pytest.mark.gen_test
async def test_refused_subscription_is_logged_counted_and_silent(case, fresh_refusals, refusal_log, connect,
                                                                 base_url):
    user_id, frame, reason, fragments = SUBSCRIPTION_CASES[case]
    assert reason in SUBSCRIPTION_REASONS
    client = await open_client(connect, user_id)
    await client.send(frame)
    await answered_next(client)  # error frames are off: the client got nothing, as from Baserow

    (line,) = lines(refusal_log)
    assert line.levelno == logging.INFO
    message = line.getMessage()
    assert message.startswith(f"refused subscription: reason={reason} "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert WRONG_TOKEN not in refusal_log.text and LONG not in refusal_log.text
    assert await refusals_on_metrics(base_url, "subscription") == {reason: 1.0}


@pytest.mark.gen_test
async def test_an_accepted_subscription_counts_nothing(fresh_refusals, refusal_log, connect, base_url):
    client = await connect(user_id=1)
    await client.subscribe("table", table_id=10)
    await client.subscribe("view", slug="secret-view", token="s3cret")
    assert lines(refusal_log) == []
    assert await refusals_on_metrics(base_url, "subscription") == {}


@pytest.mark.rt_settings(max_subscriptions=1)
@pytest.mark.gen_test
async def test_too_many_subscriptions_is_logged_before_the_4008_close(fresh_refusals, refusal_log, connect,
                                                                       base_url):
    client = await connect(user_id=1)
    await client.subscribe("table", table_id=10)
    await client.send({"page": "table", "table_id": 11})
    assert await client.expect_close() == closecodes.POLICY_VIOLATION
    (line,) = lines(refusal_log)
    assert line.getMessage() == ("refused subscription: reason=too_many_subscriptions page='table' "
                                 "parameters={'table_id': 11} user_id=1 limit=1")
    assert await refusals_on_metrics(base_url, "subscription") == {"too_many_subscriptions": 1.0}


FRAME_CASES = {"not_json": "{not json", "not_an_object": "[1, 2]", "no_action": '{"type": "page", "id": 1}',
               "binary": b"\x00\x01binary"}


@pytest.mark.parametrize("reason", sorted(FRAME_CASES))
@pytest.mark.gen_test
async def test_an_ignored_frame_is_logged_at_debug_and_counted(reason, fresh_refusals, refusal_log, connect,
                                                               base_url):
    assert reason in FRAME_REASONS
    client = await connect(user_id=7)
    await client.send(FRAME_CASES[reason])
    await answered_next(client)
    (line,) = lines(refusal_log)
    assert line.levelno == logging.DEBUG
    assert line.getMessage().startswith(f"refused frame: reason={reason} user_id=7"), line.getMessage()
    assert await refusals_on_metrics(base_url, "frame") == {reason: 1.0}


@pytest.mark.gen_test
async def test_frame_refusals_are_not_written_at_info(fresh_refusals, caplog, connect, base_url):
    caplog.set_level(logging.INFO, logger="tornado_rt.refusals")
    client = await connect(user_id=7)
    await client.send("{not json")
    await answered_next(client)
    assert lines(caplog) == []
    assert await refusals_on_metrics(base_url, "frame") == {"not_json": 1.0}


@pytest.mark.rt_settings(max_incoming_rate=0)  # unlimited: the flood reaches the refusal path
@pytest.mark.gen_test(timeout=60)
async def test_ten_thousand_refusals_cannot_flood_the_log(fresh_refusals, refusal_log, clock, connect, base_url):
    noisy = await connect(user_id=1)
    for i in range(10_000):
        noisy.send({"page": "table", "table_id": 20, "n": i})  # not a member, 10,000 times
    await answered_next(noisy)
    assert fresh_refusals.count("subscription", "not_a_member") == 10_000
    logged = lines(refusal_log, "refused subscription: reason=not_a_member")
    assert len(logged) == fresh_refusals.per_key_per_second == 5
    # Another connection's refusal is still written: the per-connection limit held the noisy one.
    quiet = await connect(user_id=4)
    await quiet.send({"page": "table", "table_id": 10})
    await answered_next(quiet)
    assert len(lines(refusal_log, "refused subscription: reason=not_a_member page='table' "
                                  "parameters={'table_id': 10} user_id=4")) == 1
    assert lines(refusal_log, "refusal log lines suppressed") == []
    clock.now += 1.0
    fresh_refusals.flush()  # what the timer does when the window is over
    (suppressed,) = lines(refusal_log, "9995 refusal log lines suppressed in the last second (subscription=9995)")
    assert suppressed.levelno == logging.WARNING
    assert await refusals_on_metrics(base_url, "subscription") == {"not_a_member": 10_001.0}


# --- the access webhook reports its reason -------------------------------------------------------------

class _Decide(RequestHandler):
    def post(self):
        page_id = ujson.loads(self.request.body)["parameters"]["id"]
        if page_id == 500:
            self.set_status(500)
            self.finish("boom")
        elif page_id == 403:
            self.finish({"allow": False, "reason": "suspended"})
        else:
            self.finish({"allow": False, "reason": "not a short code\nINFO forged"})


@pytest.fixture
def webhook_page(server, io_loop):
    sockets = bind_sockets(0, "127.0.0.1")
    backend = HTTPServer(Application([(r"/decide", _Decide)]))
    backend.add_sockets(sockets)
    webhook = AccessWebhook(f"http://127.0.0.1:{sockets[0].getsockname()[1]}/decide", cache_ttl=0)
    server.registry.page_types["hooked"] = PageType("hooked", ("id",), "hooked-{id}", webhook.page_check("hooked"))
    yield
    webhook.close()
    backend.stop()


@pytest.mark.gen_test
async def test_webhook_refusals_carry_the_backends_reason(webhook_page, fresh_refusals, refusal_log, connect,
                                                          base_url):
    client = await connect(user_id=1)
    for page_id in (403, 500, 1):
        await client.send({"page": "hooked", "id": page_id})
    await answered_next(client)
    messages = [r.getMessage() for r in lines(refusal_log)]
    assert messages == [
        "refused subscription: reason=webhook_denied page='hooked' parameters={'id': 403} user_id=1 "
        "webhook_reason='suspended'",
        "refused subscription: reason=webhook_error page='hooked' parameters={'id': 500} user_id=1",
        # a reason that is not a short code is not written
        "refused subscription: reason=webhook_denied page='hooked' parameters={'id': 1} user_id=1",
    ]
    assert await refusals_on_metrics(base_url, "subscription") == {"webhook_denied": 2.0, "webhook_error": 1.0}


# --- an embedder's authenticator ------------------------------------------------------------------------

@pytest.mark.rt_server(plugins=[CHECKS], authenticator=lambda token: None if token == "nobody" else 5)
@pytest.mark.gen_test
async def test_an_authenticator_answering_none_is_counted_once(fresh_refusals, refusal_log, connect, base_url):
    refused = await connect(token="nobody", authenticate=False)
    assert (await refused.recv())["success"] is False
    assert await refused.expect_close() == closecodes.AUTHENTICATION_FAILED
    accepted = await connect(token="anyone")
    assert accepted.web_socket_id
    assert [r.getMessage() for r in lines(refusal_log)] == ["refused token: reason=authenticator_refused"]
    assert await refusals_on_metrics(base_url, "token") == {"authenticator_refused": 1.0}


# --- error frames ---------------------------------------------------------------------------------------

# case -> the code of the error frame (access-check reasons are all access_denied for the client)
ERROR_CODES = {"unknown_page_type": "unknown_page_type", "missing_parameter": "missing_parameter",
               "invalid_parameter": "invalid_parameter", "anonymous_not_allowed": "anonymous_not_allowed",
               "unknown_table": "access_denied", "unknown_table_row": "access_denied",
               "not_a_member": "access_denied", "unknown_view": "access_denied", "bad_token": "access_denied",
               "access_denied": "access_denied", "access_error": "access_denied", "long_value": "invalid_parameter",
               "credential_parameter": "unknown_page_type"}


@pytest.mark.rt_settings(error_frames=True)
@pytest.mark.parametrize("case", sorted(SUBSCRIPTION_CASES))
@pytest.mark.gen_test
async def test_error_frames_on_tell_the_client_why(case, fresh_refusals, connect, barrier):
    user_id, frame, reason, _ = SUBSCRIPTION_CASES[case]
    client = await open_client(connect, user_id)
    await client.send(frame)
    error = await client.recv()
    page = ujson.loads(frame)["page"] if isinstance(frame, str) else frame["page"]
    assert error == {"type": "error", "code": ERROR_CODES[case], "message": SUBSCRIPTION_REASONS[ERROR_CODES[case]],
                     "page": page}
    await barrier(client)
    assert fresh_refusals.count("subscription", reason) == 1  # the operator still sees the real reason


@pytest.mark.rt_settings(error_frames=True)
@pytest.mark.parametrize("reason", sorted(FRAME_CASES))
@pytest.mark.gen_test
async def test_error_frames_on_answer_an_ignored_frame(reason, fresh_refusals, connect, barrier):
    client = await connect(user_id=1)
    await client.send(FRAME_CASES[reason])
    assert await client.recv() == {"type": "error", "code": reason, "message": FRAME_REASONS[reason]}
    await barrier(client)
    await answered_next(client)


@pytest.mark.rt_settings(error_frames=True, max_subscriptions=1)
@pytest.mark.gen_test
async def test_error_frames_on_say_why_before_the_4008_close(fresh_refusals, connect):
    client = await connect(user_id=1)
    await client.subscribe("table", table_id=10)
    await client.send({"page": "table", "table_id": 11})
    assert await client.recv() == {"type": "error", "code": "too_many_subscriptions", "page": "table",
                                   "message": SUBSCRIPTION_REASONS["too_many_subscriptions"]}
    assert await client.expect_close() == closecodes.POLICY_VIOLATION


@pytest.mark.rt_settings(error_frames=True)
@pytest.mark.gen_test
async def test_error_frames_on_change_nothing_for_a_good_client(connect, barrier):
    client = await connect(user_id=1)
    assert await client.subscribe("table", table_id=10) == {"type": "page_add", "page": "table",
                                                             "parameters": {"table_id": 10}}
    await client.send({"remove_page": "table", "table_id": 10})
    assert (await client.recv())["type"] == "page_discard"
    await barrier(client)


# --- the switch of `tornado-rt serve` ------------------------------------------------------------------

def _resolve(argv, env=None):
    from tornado_rt import cli
    return cli.settings(cli.resolve(cli.build_parser().parse_args(["serve", "--jwt-secret", "s", "--api-key", "k",
                                                                   *argv]), env or {}))


def test_error_frames_are_off_by_default_on_with_dev_and_the_given_setting_wins():
    assert _resolve([]).error_frames is False
    assert _resolve(["--error-frames"]).error_frames is True
    assert _resolve(["--dev"]).error_frames is True
    assert _resolve(["--dev"], {"TORNADO_RT_ERROR_FRAMES": "false"}).error_frames is False


@pytest.mark.gen_test(timeout=30)
async def test_tornado_rt_serve_dev_answers_a_refused_subscription_with_an_error_frame():
    from standalone import SECRET as SERVE_SECRET
    from standalone import ServeProcess, WsClient, clean_env
    from standalone import make_token as serve_token
    proc = ServeProcess(["serve", "--dev", "--port", "0"],
                        env=clean_env(TORNADO_RT_JWT_SECRET=SERVE_SECRET, TORNADO_RT_API_KEYS=API_KEY))
    try:
        assert "Error frames are on" in proc.stdout()
        client = await WsClient.connect(proc.ws_url, token=serve_token(user_id=1))
        await client.send({"page": "table", "table_id": 2})  # not in the demo directory
        assert await client.recv() == {"type": "error", "code": "access_denied", "page": "table",
                                       "message": SUBSCRIPTION_REASONS["access_denied"]}
        assert (await client.subscribe("table", table_id=1))["type"] == "page_add"  # demo: user 1, table 1
        assert await refusals_on_metrics(proc.base, "subscription") == {"unknown_table": 1.0}
    finally:
        assert await proc.stopped() == 0, proc.output()
    assert "refused subscription: reason=unknown_table page='table' parameters={'table_id': 2} user_id=1" in \
        proc.stderr()
