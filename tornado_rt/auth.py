"""Authentication: turning the ``jwt_token`` query argument into a :class:`Principal`.

An *authenticator* is any callable ``token -> Principal | user id | None`` (or an awaitable of
one). ``None`` means refused. The default is :class:`JWTAuthenticator`, compatible with Baserow's
access tokens (djangorestframework-simplejwt: HS256, claim ``user_id``, ``exp`` required,
``token_type`` must be ``access`` when present).

The literal token ``anonymous`` never reaches the authenticator: the connection decides it from
``Settings.allow_anonymous``.
"""
from __future__ import annotations

import logging
import traceback
from typing import Awaitable, Callable, Optional, Union

import jwt

from .principal import Principal, normalize_id
from .settings import Settings

log = logging.getLogger("tornado_rt.auth")

AuthResult = Union[Principal, int, str, None]
Authenticator = Callable[[str], Union[AuthResult, Awaitable[AuthResult]]]

_HMAC = ("HS256", "HS384", "HS512")


class JWTAuthenticator:
    """Validate a JWT and return the principal named by its user claim.

    Refused (returns ``None``): a token over ``max_token_length`` bytes, ``alg: none`` or any
    algorithm outside the allow-list, a bad signature, ``exp`` missing or past, ``nbf`` in the
    future, a wrong ``aud``/``iss`` when configured, a ``token_type`` other than ``access``, a
    missing or non-id user claim. Asymmetric and HMAC algorithms never share a key: HMAC
    algorithms use ``jwt_secret`` only and the others ``jwt_public_key`` only, so a token HMAC-signed
    with the public key is refused.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._hmac = tuple(a for a in settings.jwt_algorithms if a in _HMAC)
        self._asym = tuple(a for a in settings.jwt_algorithms if a not in _HMAC)
        if self._hmac and not settings.jwt_secret:
            raise ValueError("jwt_secret is required for " + ", ".join(self._hmac))
        if self._asym and not settings.jwt_public_key:
            raise ValueError("jwt_public_key is required for " + ", ".join(self._asym))
        self._options = {"require": ["exp"]}

    def __call__(self, token: str) -> Optional[Principal]:
        s = self.settings
        if len(token) > s.max_token_length:
            return None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        alg = header.get("alg")
        if alg in self._hmac:
            key, algorithms = s.jwt_secret, [alg]
        elif alg in self._asym:
            key, algorithms = s.jwt_public_key, [alg]
        else:
            return None
        try:
            claims = jwt.decode(
                token, key, algorithms=algorithms, options=self._options, leeway=s.jwt_leeway,
                audience=s.jwt_audience, issuer=s.jwt_issuer,
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            return None
        token_type = claims.get("token_type")
        if token_type is not None and token_type != "access":
            return None
        user_id = normalize_id(claims.get(s.jwt_user_claim))
        if user_id is None:
            return None
        return Principal(user_id, claims)


def to_principal(result: AuthResult) -> Optional[Principal]:
    """Accept what an authenticator may return: a Principal, a bare user id, or None."""
    if result is None or isinstance(result, Principal):
        return result
    user_id = normalize_id(result)
    return Principal(user_id) if user_id is not None else None


def log_authenticator_error(token: Optional[str]) -> None:
    """Log the exception being handled by an authenticator's caller, with ``token`` redacted:
    the embedder's exception may quote the token, and tokens never reach a log."""
    text = traceback.format_exc().rstrip()
    if token:
        text = text.replace(token, "[redacted]")
    log.error("authenticator raised; connection refused\n%s", text)
