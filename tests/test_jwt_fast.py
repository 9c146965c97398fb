"""The fast verified decode of HMAC tokens (JWTAuthenticator._fast_decode) only ever says yes
where PyJWT's full decode says yes, with the same claims; everything else takes the full path,
which names the reason. Pure unit tests (the connection-level refusals are in test_auth.py and
test_jwt_attacks.py, which run unchanged over real sockets)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any, Dict, List

import jwt

from tornado_rt.auth import JWTAuthenticator
from tornado_rt.settings import Settings

SECRET = "jwt-fast-test-secret-0123456789abcdef"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: Any, payload: Any, secret: str = SECRET, raw: bool = False) -> str:
    """A token HMAC-SHA256-signed over exactly these header and payload bytes."""
    h = header if raw else b64(json.dumps(header).encode())
    p = payload if raw else b64(json.dumps(payload).encode())
    sig = hmac.new(secret.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(sig)}"


def full(auth: JWTAuthenticator, token: str) -> Any:
    claims, reason, _ = auth._full_check(token)
    return claims if claims is not None else reason


def auth_for(**settings: Any) -> JWTAuthenticator:
    return JWTAuthenticator(Settings(jwt_secret=SECRET, **settings), cache_size=0)


def test_an_ordinary_token_takes_the_fast_path_with_pyjwts_claims() -> None:
    auth = auth_for()
    now = int(time.time())
    token = jwt.encode({"user_id": 7, "exp": now + 60, "iat": now, "jti": "abc", "token_type": "access"},
                       SECRET, algorithm="HS256")
    fast = auth._fast_decode(token)
    assert fast is not None
    assert fast == full(auth, token) == jwt.decode(token, SECRET, algorithms=["HS256"])
    principal, reason, _ = auth.check(token)
    assert principal is not None and principal.user_id == 7 and reason == ""


def test_the_fast_path_never_accepts_what_the_full_decode_refuses() -> None:
    auth = auth_for()
    now = int(time.time())
    good = {"user_id": 1, "exp": now + 60}
    good_header = {"alg": "HS256", "typ": "JWT"}
    canonical = signed(good_header, good)
    h, p, s = canonical.split(".")
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    flipped = s[:-1] + last[last.index(s[-1]) ^ 1]  # the same signature bytes, non-canonical
    cases: List[str] = [
        signed(good_header, {"user_id": 1, "exp": now - 10}),             # expired
        signed(good_header, {"user_id": 1}),                                # exp missing
        signed(good_header, {"user_id": 1, "exp": None}),                   # exp null
        signed(good_header, {"user_id": 1, "exp": str(now + 60)}),          # exp a string
        signed(good_header, {"user_id": 1, "exp": True}),                   # exp a bool
        signed(good_header, {"user_id": 1, "exp": now + 60, "nbf": now + 600}),  # not yet valid
        signed(good_header, {"user_id": 1, "exp": now + 60, "iat": now + 600}),  # iat in the future
        signed(good_header, {"user_id": 1, "exp": now + 60, "iat": "x"}),   # iat not a number
        signed(good_header, {"user_id": 1, "exp": now + 60, "aud": "x"}),   # aud without an audience
        signed(good_header, {"user_id": 1, "exp": now + 60, "sub": 5}),     # sub not a string
        signed(good_header, {"user_id": 1, "exp": now + 60, "jti": 5}),     # jti not a string
        signed(good_header, [1, 2]),                                        # payload not an object
        signed({"alg": "HS256", "kid": 5}, good),                           # kid not a string
        signed({"alg": "HS256", "crit": ["exp"]}, good),                    # unsupported crit
        signed({"alg": "HS256", "b64": False, "crit": ["b64"]}, good),      # detached payload
        signed({"alg": "none"}, good),                                      # not an allowed algorithm
        signed({"alg": "HS512"}, good),                                     # not an allowed algorithm
        signed(good_header, good, secret="another-secret-0123456789abcdef"),  # bad signature
        f"{h}.{p}.{flipped}",                                               # non-canonical signature
        f"{h}.{p}.{s}=",                                                    # padded signature
        f"{h}.{p}.{s[:-1]}",                                                # truncated signature
        f"{h}.{p}",                                                         # two segments
        f"{h}.{p}.{s}.{s}",                                                 # four segments
        signed(b64(b"not json"), b64(json.dumps(good).encode()), raw=True),  # header not JSON
        signed(b64(json.dumps(good_header).encode()), b64(b"\xff\xfe"), raw=True),  # payload not JSON
    ]
    refused = 0
    for token in cases:
        verdict = full(auth, token)
        fast = auth._fast_decode(token)
        principal, reason, _ = auth.check(token)
        if isinstance(verdict, str):  # refused by PyJWT: refused, with the same reason
            refused += 1
            assert fast is None, (token, verdict)
            assert principal is None and reason == verdict
        else:  # PyJWT accepts a few odd ones (exp "123", exp true): the fast path leaves them to it
            assert fast is None, (token, verdict)
            assert principal is not None and principal.claims == verdict
    assert refused == len(cases) - 2
    assert auth._fast_decode(canonical) == full(auth, canonical) == good


def test_the_fast_path_is_off_where_pyjwt_would_warn_or_check_more() -> None:
    assert auth_for()._fast  # the default: HS256 with a long enough secret
    short = JWTAuthenticator(Settings(jwt_secret="short-secret", jwt_algorithms=["HS256"]), cache_size=0)
    assert not short._fast  # PyJWT warns about the key length on every decode: its own path
    assert not auth_for(jwt_audience="rt")._fast  # an audience to check: the full decode
    assert not auth_for(jwt_issuer="baserow")._fast
    now = int(time.time())
    token = jwt.encode({"user_id": 3, "exp": now + 60, "aud": "rt"}, SECRET, algorithm="HS256")
    principal, reason, _ = auth_for(jwt_audience="rt").check(token)
    assert principal is not None and principal.user_id == 3 and reason == ""


def test_leeway_applies_to_the_fast_path_as_to_pyjwt() -> None:
    now = int(time.time())
    token = signed({"alg": "HS256", "typ": "JWT"}, {"user_id": 2, "exp": now - 5})
    strict, lenient = auth_for(), auth_for(jwt_leeway=60)
    assert strict._fast_decode(token) is None and full(strict, token) == "expired"
    claims: Dict[str, Any] = lenient._fast_decode(token) or {}
    assert claims == full(lenient, token) and claims["user_id"] == 2


def test_segments_decode_as_pyjwt_reads_them() -> None:
    """_b64 accepts exactly the canonical unpadded segments (PyJWT: a re-encoding that differs is
    refused) and decodes them as base64url does: every length, random bytes and random strings."""
    import random

    from tornado_rt.auth import _b64

    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    rng = random.Random(16)
    for n in range(1, 40):
        for _ in range(50):
            data = bytes(rng.randrange(256) for _ in range(n))
            assert _b64(b64(data)) == data
            text = "".join(rng.choice(alphabet) for _ in range(n))
            canonical = n % 4 != 1
            if canonical:
                decoded = base64.urlsafe_b64decode(text + "=" * (-n % 4))
                canonical = b64(decoded) == text
            try:
                assert _b64(text) == decoded and canonical
            except ValueError:
                assert not canonical
