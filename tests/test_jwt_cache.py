"""JWTAuthenticator remembers verified tokens until they expire (pure unit tests, a clock the test
controls; no sleeping). A remembered token is refused as ``expired`` once its ``exp`` (+ leeway)
passes, refusals are never remembered, and the cache is bounded."""
from __future__ import annotations

import base64
import json
import time
from typing import Any, Dict, List

import jwt

from tornado_rt.auth import JWTAuthenticator
from tornado_rt.settings import Settings

SECRET = "jwt-cache-test-secret-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def token(user_id: int, exp: int, **extra: Any) -> str:
    claims: Dict[str, Any] = {"user_id": user_id, "exp": exp, "token_type": "access", **extra}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def make(clock: Clock, **kwargs: Any) -> JWTAuthenticator:
    return JWTAuthenticator(Settings(jwt_secret=SECRET, **kwargs.pop("settings", {})), clock=clock, **kwargs)


def reasons(auth: JWTAuthenticator, tokens: List[str]) -> List[Any]:
    out = []
    for t in tokens:
        principal, reason, context = auth.check(t)
        out.append(principal.user_id if principal is not None else (reason, context.get("user_id")))
    return out


def test_a_remembered_token_is_refused_once_its_exp_passes() -> None:
    clock = Clock()
    exp = int(clock.now) + 600
    auth = make(clock)
    t = token(7, exp)
    assert reasons(auth, [t, t]) == [7, 7]
    clock.now = exp - 1
    assert reasons(auth, [t]) == [7]
    clock.now = exp  # PyJWT: expired once exp <= now - leeway
    assert reasons(auth, [t, t]) == [("expired", 7), ("expired", 7)]


def test_an_expired_token_is_refused_every_time_and_a_valid_one_accepted() -> None:
    clock = Clock()
    auth = make(clock)
    expired = token(3, int(clock.now) - 60)
    valid = token(4, int(clock.now) + 600)
    assert reasons(auth, [expired, valid, expired, valid]) == [("expired", 3), 4, ("expired", 3), 4]


def test_leeway_extends_the_remembered_lifetime_exactly_as_the_full_check() -> None:
    clock = Clock()
    exp = int(clock.now) + 600
    auth = make(clock, settings={"jwt_leeway": 30})
    t = token(5, exp)
    assert reasons(auth, [t]) == [5]
    clock.now = exp + 29.5
    assert reasons(auth, [t]) == [5]
    clock.now = exp + 30
    assert reasons(auth, [t]) == [("expired", 5)]


def test_the_cache_is_bounded_and_can_be_turned_off() -> None:
    clock = Clock()
    exp = int(clock.now) + 600
    first, second = token(1, exp), token(2, exp)
    auth = make(clock, cache_size=1)
    assert reasons(auth, [first, second]) == [1, 2]  # second pushes first out
    clock.now = exp + 1  # only a remembered token is judged by this clock; PyJWT's is real time
    assert reasons(auth, [second, first]) == [("expired", 2), 1]

    clock = Clock()
    off = make(clock, cache_size=0)
    assert reasons(off, [first]) == [1]
    clock.now = exp + 1
    assert reasons(off, [first]) == [1]  # checked in full again: nothing was remembered


def test_refused_tokens_keep_their_reasons() -> None:
    clock = Clock()
    auth = make(clock)
    exp = int(clock.now) + 600
    good = token(9, exp)
    header, payload, signature = good.split(".")
    none_alg = jwt.encode({"user_id": 9, "exp": exp}, None, algorithm="none")

    def seg(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    assert reasons(auth, [
        f"{header}.{payload}.{signature[:-4]}AAAA",  # wrong signature
        f"{header}.{payload[:-2]}!!.{signature}",  # our algorithm, payload not base64url
        f"{seg({'alg': 'HS999'})}.{payload}!.{signature}",  # unknown alg, malformed payload
        f"{seg({'alg': 'HS999'})}.{payload}.{signature}",  # unknown alg, well formed
        none_alg,
        "not-a-token",
        token(9, exp, token_type="refresh"),
    ]) == [("bad_signature", None), ("malformed", None), ("malformed", None), ("algorithm", None),
           ("algorithm", None), ("malformed", None), ("refresh_token", 9)]
    assert reasons(auth, [good]) == [9]
