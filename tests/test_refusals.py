"""Refused tokens are visible to the operator (docs/protocol.md, "Refusals"): each one closes the
connection with 4001, logs one INFO line with its reason code (and the user id once the signature
is verified), never the token, and counts in ``tornado_rt_refusals_total{kind, reason}`` on
``/metrics``. The rate limiter of :mod:`tornado_rt.refusals` is tested as pure logic."""
import logging
import time

import jwt
import pytest
import ujson
from prometheus_client.parser import text_string_to_metric_families
from tornado.websocket import websocket_connect

import tornado_rt.refusals as refusals_module
from conftest import SECRET, make_token
from standalone import API_KEY, Api, ServeProcess, clean_env
from standalone import SECRET as SERVE_SECRET
from standalone import make_token as serve_token
from tornado_rt import Principal, closecodes
from tornado_rt.httpapi import make_app
from tornado_rt.refusals import TOKEN_REASONS, Refusals

from test_auth import FAILED, RSA_PRIVATE, RSA_PUBLIC, hand_signed, claims

AUD, ISS = "tornado-rt-tests", "https://issuer.example"
OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256"


def tok(**kw):
    """A token valid for the server of this module (audience and issuer configured) unless
    ``kw`` says otherwise; ``aud=None`` / ``iss=None`` leave the claim out."""
    return make_token(**{"aud": AUD, "iss": ISS, **kw})


def signed_raw_payload(payload: bytes) -> str:
    """A correctly signed HS256 token whose payload is not a JSON object."""
    import base64
    import hashlib
    import hmac

    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(payload)
    return signing_input + "." + b64(hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest())


# reason -> (token factory, user id the log line names, or None when the token is not trusted)
TOKEN_CASES = {
    "too_long": (lambda: tok(padding="x" * 9000), None),
    "malformed": (lambda: "not-a-jwt", None),
    "malformed_payload": (lambda: signed_raw_payload(b"not json"), None),
    "algorithm": (lambda: tok(algorithm="HS512"), None),
    "algorithm_none": (lambda: hand_signed({"alg": "none", "typ": "JWT"}, claims(aud=AUD, iss=ISS), b"", "none"),
                       None),
    "bad_signature": (lambda: tok(secret=OTHER_SECRET), None),
    "expired": (lambda: tok(user_id=41, lifetime=-10), 41),
    "not_yet_valid": (lambda: tok(user_id=42, nbf=int(time.time()) + 600), 42),
    "missing_claim": (lambda: tok(user_id=43, exp=None), 43),
    "missing_claim_user": (lambda: tok(user_id=None), None),
    "wrong_audience": (lambda: tok(user_id=44, aud="someone-else"), 44),
    "wrong_issuer": (lambda: tok(user_id=45, iss="https://evil.example"), 45),
    "invalid_claim": (lambda: tok(user_id=1.5), None),
    "refresh_token": (lambda: tok(user_id=46, token_type="refresh"), 46),
}
EXPECTED_REASON = {"malformed_payload": "malformed", "algorithm_none": "algorithm",
                   "missing_claim_user": "missing_claim"}


@pytest.fixture
def settings(request):
    from tornado_rt import Settings
    marker = request.node.get_closest_marker("rt_settings")  # honoured, as in conftest
    return Settings(jwt_secret=SECRET, ping_interval=0, jwt_audience=AUD, jwt_issuer=ISS,
                    **(marker.kwargs if marker else {}))


@pytest.fixture
def app(server):
    return make_app(server, [API_KEY])


@pytest.fixture
def fresh_refusals(monkeypatch):
    """A fresh process-wide Refusals: counts start at zero and no earlier test used up this
    second's log lines."""
    fresh = Refusals()
    monkeypatch.setattr(refusals_module, "REFUSALS", fresh)
    return fresh


@pytest.fixture
def refusal_log(caplog):
    caplog.set_level(logging.INFO, logger="tornado_rt.refusals")
    return caplog


async def token_refusals(base_url):
    """{reason: value} of tornado_rt_refusals_total{kind="token"} from a real /metrics scrape."""
    status, text, _ = await Api(base_url).call("GET", "/metrics", key=None)
    assert status == 200, text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tornado_rt_refusals_total" and sample.labels.get("kind") == "token":
                found[sample.labels["reason"]] = sample.value
    return found


async def refused_over_socket(ws_url, query):
    conn = await websocket_connect(ws_url + query)
    try:
        assert ujson.loads(await conn.read_message()) == FAILED
        assert await conn.read_message() is None
        assert conn.close_code == closecodes.AUTHENTICATION_FAILED == 4001
    finally:
        conn.close()


def refusal_lines(caplog):
    return [r for r in caplog.records if r.name == "tornado_rt.refusals"]


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
@pytest.mark.gen_test
async def test_refused_token_is_logged_with_its_reason_and_counted(case, fresh_refusals, refusal_log, ws_url,
                                                                   base_url):
    make, user_id = TOKEN_CASES[case]
    reason = EXPECTED_REASON.get(case, case)
    assert reason in TOKEN_REASONS
    token = make()
    await refused_over_socket(ws_url, f"?jwt_token={token}")

    lines = refusal_lines(refusal_log)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    line = lines[0]
    assert line.levelno == logging.INFO
    message = line.getMessage()
    assert message.startswith(f"refused token: reason={reason}"), message
    if user_id is not None:
        assert f"user_id={user_id}" in message, message
    else:
        assert "user_id=" not in message, message
    for secret_part in (token, *[p for p in token.split(".") if len(p) > 8]):
        assert secret_part not in refusal_log.text
    assert await token_refusals(base_url) == {reason: 1.0}


def raising(token):
    raise ValueError(f"backend down while checking {token!r}")


@pytest.mark.rt_server(authenticator=raising)
@pytest.mark.gen_test
async def test_authenticator_error_is_counted_without_the_token(fresh_refusals, refusal_log, ws_url, base_url):
    token = "opaque-session-token-0123456789"
    await refused_over_socket(ws_url, f"?jwt_token={token}")
    messages = [r.getMessage() for r in refusal_log.records]
    assert "refused token: reason=authenticator_error" in messages, messages
    assert token not in refusal_log.text
    assert await token_refusals(base_url) == {"authenticator_error": 1.0}


@pytest.mark.rt_settings(allow_anonymous=False)
@pytest.mark.gen_test
async def test_anonymous_disabled_is_counted(fresh_refusals, refusal_log, ws_url, base_url):
    await refused_over_socket(ws_url, "?jwt_token=anonymous")
    assert await token_refusals(base_url) == {"anonymous_disabled": 1.0}


@pytest.mark.gen_test
async def test_missing_token_is_counted(fresh_refusals, refusal_log, ws_url, base_url):
    await refused_over_socket(ws_url, "")
    assert await token_refusals(base_url) == {"missing": 1.0}


@pytest.mark.gen_test
async def test_accepted_token_counts_nothing(fresh_refusals, refusal_log, ws_url, base_url):
    conn = await websocket_connect(f"{ws_url}?jwt_token={tok()}")
    assert ujson.loads(await conn.read_message())["success"] is True
    conn.close()
    assert await token_refusals(base_url) == {}
    assert refusal_lines(refusal_log) == []


@pytest.mark.gen_test(timeout=30)
async def test_standalone_server_logs_and_counts_a_refused_token():
    """``tornado-rt serve`` at its default log level: the line is on stderr, the token is not."""
    proc = ServeProcess(["serve", "--port", "0", "--jwt-secret", SERVE_SECRET, "--api-key", API_KEY],
                        env=clean_env())
    try:
        expired = serve_token(user_id=77, lifetime=-60)
        refresh = serve_token(user_id=78, token_type="refresh")
        for token in (expired, refresh):
            await refused_over_socket(proc.ws_url, f"?jwt_token={token}")
        counted = await token_refusals(proc.base)
    finally:
        assert proc.stop() == 0, proc.output()
    stderr = proc.stderr()
    assert "INFO tornado_rt.refusals: refused token: reason=expired user_id=77" in stderr, stderr
    assert "INFO tornado_rt.refusals: refused token: reason=refresh_token claim='token_type' user_id=78" in stderr
    for token in (expired, refresh):
        assert token.split(".")[2] not in stderr and token not in stderr
    assert counted == {"expired": 1.0, "refresh_token": 1.0}


# --- the refusals module as pure logic ----------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_refusals(caplog, **kw):
    caplog.set_level(logging.DEBUG, logger="test.refusals")
    clock = Clock()
    return Refusals(clock=clock, logger=logging.getLogger("test.refusals"), **kw), clock


def lines_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "test.refusals"]


def test_rate_limit_per_second_counts_everything_and_reports_what_it_suppressed(caplog):
    refusals, clock = make_refusals(caplog, per_second=3, per_key_per_second=100)
    for i in range(10):
        refusals.refuse("token", "expired", user_id=i)
    assert refusals.count("token", "expired") == 10
    assert lines_of(caplog) == [f"refused token: reason=expired user_id={i}" for i in range(3)]
    clock.now += 1.0
    refusals.refuse("frame", "not_json", level=logging.DEBUG)
    assert lines_of(caplog)[3:] == [
        "7 refusal log lines suppressed in the last second (token=7); the counters on /metrics count "
        "every refusal",
        "refused frame: reason=not_json",
    ]
    assert refusals.counts() == {("token", "expired"): 10, ("frame", "not_json"): 1}


def test_rate_limit_per_key_leaves_other_keys_alone(caplog):
    refusals, clock = make_refusals(caplog, per_second=100, per_key_per_second=2)
    for _ in range(5):
        refusals.refuse("subscription", "not_a_member", key="noisy", page="table")
    refusals.refuse("subscription", "unknown_table", key="quiet", page="table", table_id=9)
    assert lines_of(caplog) == ["refused subscription: reason=not_a_member page='table'"] * 2 + [
        "refused subscription: reason=unknown_table page='table' table_id=9"]
    clock.now += 1.5
    refusals.flush()  # what the timer does when the second is over
    assert lines_of(caplog)[-1].startswith("3 refusal log lines suppressed in the last second (subscription=3)")
    refusals.flush()
    assert len(lines_of(caplog)) == 4  # reported once


def test_a_level_that_is_off_counts_but_writes_nothing(caplog):
    caplog.set_level(logging.INFO, logger="test.quiet")
    refusals = Refusals(logger=logging.getLogger("test.quiet"))
    refusals.refuse("frame", "not_an_object", level=logging.DEBUG)
    assert refusals.count("frame", "not_an_object") == 1
    assert [r for r in caplog.records if r.name == "test.quiet"] == []


def test_values_cannot_forge_a_log_line_and_credentials_are_refused(caplog):
    refusals, _ = make_refusals(caplog)
    refusals.refuse("subscription", "unknown_page_type", page="x\nINFO forged line")
    assert lines_of(caplog) == ["refused subscription: reason=unknown_page_type page='x\\nINFO forged line'"]
    for key in ("token", "jwt_token", "api_key", "Authorization"):
        with pytest.raises(ValueError):
            refusals.refuse("token", "expired", **{key: "secret"})


def test_jwt_authenticator_check_reports_reasons_without_logging():
    from tornado_rt import JWTAuthenticator, Settings
    auth = JWTAuthenticator(Settings(jwt_secret=SECRET, jwt_algorithms=("HS256", "RS256"), jwt_public_key=RSA_PUBLIC))
    rs = jwt.encode(claims(user_id=5, lifetime=-5), RSA_PRIVATE, algorithm="RS256")
    assert auth.check(rs)[1:] == ("expired", {"user_id": 5})
    principal, reason, context = auth.check(make_token(7))
    assert isinstance(principal, Principal) and principal.user_id == 7 and reason == "" and context == {}
