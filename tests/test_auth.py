"""docs/protocol.md §1: connecting, the authentication message, and every way a token is refused."""
import asyncio
import base64
import hashlib
import hmac
import logging
import time
import uuid

import jwt
import pytest
import ujson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from tornado_rt import Principal, closecodes

from conftest import SECRET, make_token

FAILED = {"type": "authentication", "success": False, "web_socket_id": None}

_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PRIVATE = _rsa.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode()
RSA_PUBLIC = _rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict, claims: dict, key: bytes, alg: str = "HS256") -> str:
    """A JWT built by hand: PyJWT itself refuses to HMAC-sign with a PEM key or to emit alg none."""
    signing_input = f"{b64(ujson.dumps(header).encode())}.{b64(ujson.dumps(claims).encode())}"
    if alg == "none":
        return signing_input + "."
    digest = {"HS256": hashlib.sha256}[alg]
    return signing_input + "." + b64(hmac.new(key, signing_input.encode(), digest).digest())


def claims(user_id=1, lifetime=300, **extra):
    return {"user_id": user_id, "exp": int(time.time()) + lifetime, "token_type": "access", **extra}


async def refused(connect, token=None, query=None):
    """The refusal of §1: the failure message, then close 4001, and nothing else."""
    client = await connect(token=token, query=query, authenticate=False)
    assert await client.recv() == FAILED
    assert await client.expect_close() == closecodes.AUTHENTICATION_FAILED == 4001
    assert client.conn.close_reason == "authentication failed"
    return client


async def accepted(connect, token, user_id, server, barrier):
    """The token connects, and the connection belongs to ``user_id`` (a users audience reaches it)."""
    client = await connect(token=token)
    msg = {"type": "user_data_updated", "user_data": {"n": 1}}
    server.publish(msg, {"user_ids": [user_id]})
    assert await client.recv() == msg
    await barrier(client)
    return client


# --- the authentication message -----------------------------------------------------------------

@pytest.mark.gen_test
async def test_authentication_message_shape_and_uuid4_ids(connect):
    ids = set()
    for user_id in (1, 1, 2):
        client = await connect(token=make_token(user_id), authenticate=False)
        auth = await client.recv()
        assert set(auth) == {"type", "success", "web_socket_id"}
        assert auth["type"] == "authentication" and auth["success"] is True
        parsed = uuid.UUID(auth["web_socket_id"])
        assert parsed.version == 4 and str(parsed) == auth["web_socket_id"]
        ids.add(auth["web_socket_id"])
    assert len(ids) == 3


@pytest.mark.gen_test
async def test_authentication_is_the_only_first_message(server, connect, barrier):
    client = await connect()
    await barrier(client)


# --- refusals: missing, empty, invalid, expired ---------------------------------------------------

@pytest.mark.gen_test
async def test_missing_token_is_refused(connect):
    await refused(connect, query="")


@pytest.mark.gen_test
async def test_empty_token_is_refused(connect):
    await refused(connect, token="")


@pytest.mark.gen_test
async def test_invalid_token_is_refused(connect):
    await refused(connect, token="not-a-jwt")


@pytest.mark.gen_test
async def test_expired_token_is_refused(connect):
    await refused(connect, token=make_token(lifetime=-10))


@pytest.mark.gen_test
async def test_refused_connection_is_not_registered(server, connect):
    await refused(connect, token="not-a-jwt")
    assert server.hub.connections == {} and server.hub.users == {}
    assert server.counters.auth_failures == 1


# --- anonymous ------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_anonymous_token_connects_without_a_user(server, connect, barrier):
    client = await connect(token="anonymous")
    assert uuid.UUID(client.web_socket_id).version == 4
    assert server.hub.anonymous == 1 and server.hub.users == {}
    # all_users reaches it; a users audience does not
    server.publish({"type": "user_data_updated"}, {"user_ids": [1]})
    await barrier(client)


@pytest.mark.rt_settings(allow_anonymous=False)
@pytest.mark.gen_test
async def test_anonymous_refused_when_disabled(server, connect):
    await refused(connect, token="anonymous")
    assert server.hub.anonymous == 0


# --- JWT refusals with the default configuration (HS256, claim user_id) ----------------------------

REFUSED_TOKENS = {
    "alg_none": lambda: hand_signed({"alg": "none", "typ": "JWT"}, claims(), b"", alg="none"),
    "alg_none_with_signature": lambda: hand_signed({"alg": "none", "typ": "JWT"}, claims(), SECRET.encode()),
    "alg_missing": lambda: hand_signed({"typ": "JWT"}, claims(), SECRET.encode()),
    "alg_outside_allow_list_HS512": lambda: make_token(algorithm="HS512"),  # right secret, wrong alg
    "alg_outside_allow_list_HS384": lambda: make_token(algorithm="HS384"),
    "bad_signature": lambda: make_token(secret="another-secret-that-is-long-enough-for-it"),
    "tampered_claims": lambda: _tampered(),
    "expired": lambda: make_token(lifetime=-1),
    "exp_missing": lambda: make_token(exp=None),
    "nbf_in_the_future": lambda: make_token(nbf=int(time.time()) + 120),
    "user_claim_missing": lambda: make_token(user_id=None),
    "user_claim_not_an_id": lambda: make_token(user_id=1.5),
    "user_claim_empty": lambda: make_token(user_id=""),
    "refresh_token": lambda: make_token(token_type="refresh"),
    "unknown_token_type": lambda: make_token(token_type="id"),
    "over_8_KiB": lambda: make_token(padding="x" * 9000),
    "not_three_parts": lambda: "a.b",
}


def _tampered():
    header, _, sig = make_token(1).split(".")
    return f"{header}.{b64(ujson.dumps(claims(user_id=2)).encode())}.{sig}"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("kind", sorted(REFUSED_TOKENS))
@pytest.mark.gen_test
async def test_jwt_refused(kind, connect):
    await refused(connect, token=REFUSED_TOKENS[kind]())


@pytest.mark.gen_test
async def test_valid_access_token_and_token_without_token_type_accepted(server, connect, barrier):
    await accepted(connect, make_token(3), 3, server, barrier)
    await accepted(connect, make_token(4, token_type=None), 4, server, barrier)
    await accepted(connect, make_token("5"), 5, server, barrier)


def token_near(length, direction):
    """A valid HS256 token of exactly ``length`` characters, or the nearest one in ``direction``
    (-1: shorter, +1: longer): base64 cannot reach every length."""
    base = len(make_token(padding=""))
    for target in range(length, length + 4 * direction, direction):
        n = max(0, (target - base) * 3 // 4 - 3)
        while True:
            token = make_token(padding="x" * n)
            if len(token) == target:
                return token
            if len(token) > target:
                break
            n += 1
    raise AssertionError(f"no token near {length}")


@pytest.mark.gen_test
async def test_token_length_limit_is_8_KiB(server, connect, barrier):
    longest_ok, shortest_bad = token_near(8192, -1), token_near(8193, +1)
    assert len(longest_ok) <= 8192 < len(shortest_bad) and len(shortest_bad) - len(longest_ok) <= 3
    await accepted(connect, longest_ok, 1, server, barrier)
    await refused(connect, token=shortest_bad)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.rt_settings(jwt_algorithms=("HS256", "HS512"))
@pytest.mark.gen_test
async def test_hs512_accepted_once_allowed(server, connect, barrier):
    # the counterpart of alg_outside_allow_list_HS512: the same token, refused only by the allow-list
    await accepted(connect, make_token(9, algorithm="HS512"), 9, server, barrier)
    await refused(connect, token=make_token(9, algorithm="HS384"))


# --- configured audience and issuer ---------------------------------------------------------------

@pytest.mark.rt_settings(jwt_audience="baserow", jwt_issuer="https://auth.example")
@pytest.mark.gen_test
async def test_aud_and_iss_checked_when_configured(server, connect, barrier):
    await accepted(connect, make_token(2, aud="baserow", iss="https://auth.example"), 2, server, barrier)
    await refused(connect, token=make_token(aud="other", iss="https://auth.example"))
    await refused(connect, token=make_token(aud="baserow", iss="https://evil.example"))
    await refused(connect, token=make_token(iss="https://auth.example"))  # aud missing
    await refused(connect, token=make_token(aud="baserow"))  # iss missing


# --- asymmetric keys -------------------------------------------------------------------------------

@pytest.mark.rt_settings(jwt_secret=None, jwt_public_key=RSA_PUBLIC, jwt_algorithms=("RS256",))
@pytest.mark.gen_test
async def test_rs256_accepted_when_configured(server, connect, barrier):
    await accepted(connect, jwt.encode(claims(6), RSA_PRIVATE, algorithm="RS256"), 6, server, barrier)


@pytest.mark.rt_settings(jwt_secret=None, jwt_public_key=RSA_PUBLIC, jwt_algorithms=("RS256",))
@pytest.mark.gen_test
async def test_hs256_signed_with_the_rs256_public_key_refused(connect):
    token = hand_signed({"alg": "HS256", "typ": "JWT"}, claims(), RSA_PUBLIC.encode())
    await refused(connect, token=token)


@pytest.mark.rt_settings(jwt_public_key=RSA_PUBLIC, jwt_algorithms=("HS256", "RS256"))
@pytest.mark.gen_test
async def test_no_key_confusion_when_both_hs256_and_rs256_are_allowed(server, connect, barrier):
    await refused(connect, token=hand_signed({"alg": "HS256", "typ": "JWT"}, claims(), RSA_PUBLIC.encode()))
    await accepted(connect, make_token(7), 7, server, barrier)
    await accepted(connect, jwt.encode(claims(8), RSA_PRIVATE, algorithm="RS256"), 8, server, barrier)


@pytest.mark.rt_settings(jwt_secret=None, jwt_public_key=RSA_PUBLIC, jwt_algorithms=("RS256",))
@pytest.mark.gen_test
async def test_rs256_signed_by_another_key_refused(connect):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await refused(connect, token=jwt.encode(claims(), other, algorithm="RS256"))


# --- user claim and leeway -------------------------------------------------------------------------

@pytest.mark.rt_settings(jwt_user_claim="sub")
@pytest.mark.gen_test
async def test_configurable_user_claim(server, connect, barrier):
    await accepted(connect, make_token(None, sub="12"), 12, server, barrier)
    await refused(connect, token=make_token(12))  # user_id is not the configured claim


@pytest.mark.rt_settings(jwt_leeway=60)
@pytest.mark.gen_test
async def test_configurable_leeway(server, connect, barrier):
    await accepted(connect, make_token(2, lifetime=-10), 2, server, barrier)
    await accepted(connect, make_token(3, nbf=int(time.time()) + 10), 3, server, barrier)
    await refused(connect, token=make_token(lifetime=-600))


# --- authenticators supplied by the embedder -----------------------------------------------------

def sync_authenticator(token):
    return {"alice": "41", "bob": Principal(42)}.get(token)


async def async_authenticator(token):
    await asyncio.sleep(0)
    if token == "raise":
        raise RuntimeError("backend down")
    return Principal(43) if token == "carol" else None


ASYNC_CALLS = []


def counting_async_authenticator(token):
    """An async authenticator that counts its calls (a coroutine function's body would only
    count the calls that were awaited)."""
    ASYNC_CALLS.append(token)
    return async_authenticator(token)


@pytest.mark.rt_server(authenticator=sync_authenticator)
@pytest.mark.gen_test
async def test_sync_authenticator(server, connect, barrier):
    await accepted(connect, "alice", 41, server, barrier)
    await accepted(connect, "bob", 42, server, barrier)
    await refused(connect, token="mallory")
    await refused(connect, token=make_token(1))  # the JWT authenticator is replaced, not added


@pytest.mark.rt_server(authenticator=async_authenticator)
@pytest.mark.gen_test
async def test_async_authenticator(server, connect, barrier):
    await accepted(connect, "carol", 43, server, barrier)
    await refused(connect, token="mallory")
    await refused(connect, token="raise")


@pytest.mark.rt_server(authenticator=counting_async_authenticator)
@pytest.mark.gen_test
async def test_async_authenticator_called_once_per_connection(server, connect, barrier):
    ASYNC_CALLS.clear()
    await accepted(connect, "carol", 43, server, barrier)
    await refused(connect, token="mallory")
    await refused(connect, token="raise")
    anon = await connect(token="anonymous")  # the literal anonymous token never reaches it
    await barrier(anon)
    assert ASYNC_CALLS == ["carol", "mallory", "raise"]


# --- the token never reaches a log ---------------------------------------------------------------

class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture
def log_capture():
    root = logging.getLogger()
    handler = Capture()
    saved = root.level
    loggers = [logging.getLogger(n) for n in ("tornado", "tornado.access", "tornado.general",
                                              "tornado.application", "tornado_rt")]
    levels = [lg.level for lg in loggers]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(saved)
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


def raising_authenticator(token):
    if token.startswith("async"):
        async def later():
            await asyncio.sleep(0)
            raise ValueError(f"cannot decode token {token!r}")
        return later()
    raise ValueError(f"cannot decode token {token!r}")


@pytest.mark.gen_test
async def test_tokens_never_logged(server, connect, barrier, log_capture, http_port):
    good = make_token(1)
    bad = make_token(1, secret="another-secret-that-is-long-enough-for-it")
    await refused(connect, token=bad)
    client = await connect(token=good)
    await barrier(client)
    # a plain HTTP request to the endpoint (not an upgrade) is refused and logged too
    with pytest.raises(HTTPClientError):
        await AsyncHTTPClient().fetch(f"http://127.0.0.1:{http_port}/ws/core/?jwt_token={good}")
    text = "\n".join(log_capture.lines)
    # the capture works: the access log of the requests is there, redacted
    assert "/ws/core/?jwt_token=[redacted]" in text, text
    for token in (good, bad):
        assert token not in text
        assert token.split(".")[2] not in text  # not even the signature part


@pytest.mark.rt_server(authenticator=raising_authenticator)
@pytest.mark.gen_test
async def test_token_not_logged_when_the_authenticator_raises(connect, log_capture):
    sync_token, async_token = "sync-session-token-0123456789", "async-session-token-0123456789"
    await refused(connect, token=sync_token)
    await refused(connect, token=async_token)
    text = "\n".join(log_capture.lines)
    assert text.count("authenticator raised") == 2 and text.count("ValueError") >= 2, text
    assert sync_token not in text and async_token not in text, text
