"""Authentication: turning the ``jwt_token`` query argument into a :class:`Principal`.

An *authenticator* is any callable ``token -> Principal | user id | None`` (or an awaitable of
one). ``None`` means refused. The default is :class:`JWTAuthenticator`, compatible with Baserow's
access tokens (djangorestframework-simplejwt: HS256, claim ``user_id``, ``exp`` required,
``token_type`` must be ``access`` when present).

The literal token ``anonymous`` never reaches the authenticator: the connection decides it from
``Settings.allow_anonymous``.
"""
from __future__ import annotations

import base64
import binascii
import collections
import hmac
import json
import logging
import re
import time
import traceback
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple, Union

import jwt

import ujson

from .principal import Principal, normalize_id
from .redaction import redact_secret
from .refusals import refuse
from .settings import HMAC_ALGORITHMS, Settings

log = logging.getLogger("tornado_rt.auth")

AuthResult = Union[Principal, int, str, None]
Authenticator = Callable[[str], Union[AuthResult, Awaitable[AuthResult]]]


class JWTAuthenticator:
    """Validate a JWT and return the principal named by its user claim.

    Each refusal is counted and logged once at INFO with its reason code (:func:`refuse_token`),
    never with the token. Refused (returns ``None``): a token over ``max_token_length`` bytes, ``alg: none`` or any
    algorithm outside the allow-list, a bad signature, ``exp`` missing or past, ``nbf`` in the
    future, a wrong ``aud``/``iss`` when configured, a ``token_type`` other than ``access``, a
    missing or non-id user claim. Asymmetric and HMAC algorithms never share a key: HMAC
    algorithms use ``jwt_secret`` only and the others ``jwt_public_key`` only, so a token HMAC-signed
    with the public key is refused.

    Verified tokens are remembered (a bounded LRU of ``cache_size`` tokens, by token string) until
    their ``exp`` (+ ``jwt_leeway``) passes, so a token seen again (a reload, a second tab, a
    reconnect) costs a dict lookup instead of a signature check. This adds no exposure: the
    check depends only on the token and the clock (a revoked or force-disconnected user's token
    is accepted again until it expires with or without the cache; tornado-rt has no token
    revocation list). A remembered token whose ``exp`` has passed is refused as ``expired``, as
    the full check would. ``cache_size=0`` turns it off; ``clock`` (seconds since the epoch, the
    clock PyJWT uses) is for tests. Refusals are never remembered.
    """

    #: It counts and logs its own refusals with their reasons: the connection must not count its
    #: ``None`` again as ``authenticator_refused`` (an authenticator of the embedder's that does
    #: the same may set this attribute too).
    reports_refusals = True

    #: Default number of verified tokens remembered (~1 KiB each with the principal).
    CACHE_SIZE = 4096

    def __init__(self, settings: Settings, *, cache_size: int = CACHE_SIZE,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.cache_size = max(0, cache_size)
        self._clock = clock
        #: token -> (principal, the time from which it is expired)
        self._verified: "collections.OrderedDict[str, Tuple[Principal, float]]" = collections.OrderedDict()
        self._hmac = tuple(a for a in settings.jwt_algorithms if a in HMAC_ALGORITHMS)
        self._asym = tuple(a for a in settings.jwt_algorithms if a not in HMAC_ALGORITHMS)
        if self._hmac and not settings.jwt_secret:
            raise ValueError("jwt_secret is required for " + ", ".join(self._hmac))
        if self._asym and not settings.jwt_public_key:
            raise ValueError("jwt_public_key is required for " + ", ".join(self._asym))
        self._options: Any = {"require": ["exp"]}  # pyjwt's Options TypedDict
        #: The HMAC algorithms the fast verified decode may take: alg -> keyed HMAC to copy.
        self._fast = _fast_hmacs(settings) if settings.jwt_audience is None and settings.jwt_issuer is None else {}
        #: header segment -> its algorithm, for headers the fast decode has read (at most 64;
        #: an issuer signs every token with the same header, so this is a handful).
        self._headers: Dict[str, str] = {}

    def __call__(self, token: str) -> Optional[Principal]:
        principal, reason, context = self.check(token)
        if principal is None:
            refuse_token(reason, **context)
        return principal

    def check(self, token: str) -> Tuple[Optional[Principal], str, Dict[str, Any]]:
        """Validate without logging: ``(principal, "", {})`` or ``(None, reason, context)``.

        ``reason`` is one of :data:`tornado_rt.refusals.TOKEN_REASONS`; ``context`` holds what may
        be logged beside it (``user_id`` only once the signature is verified; never the token).
        """
        s = self.settings
        if len(token) > s.max_token_length:
            return None, "too_long", {"length": len(token)}
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            if self._clock() < expires:
                self._verified.move_to_end(token)
                return principal, "", {}
            # kept (not moved to the end: the LRU drops it first); its exp never "un-passes"
            return None, "expired", {"user_id": principal.user_id}
        claims = self._fast_decode(token) if self._fast else None
        if claims is None:
            claims, reason, context = self._full_check(token)
            if claims is None:
                return None, reason, context
        return self._accept(token, claims)

    def _full_check(self, token: str) -> Tuple[Any, str, Dict[str, Any]]:
        """PyJWT's decode: ``(claims, "", {})`` or ``(None, reason, context)``."""
        s = self.settings
        key: Any  # present: __init__ refuses an allowed algorithm without its key
        alg = _peek_alg(token)  # jwt.decode parses and checks the whole token itself below
        if not (isinstance(alg, str) and (alg in self._hmac or alg in self._asym)):
            try:  # not one of ours (or not read): PyJWT's parse decides malformed vs algorithm
                header = jwt.get_unverified_header(token)
            except jwt.PyJWTError:
                return None, "malformed", {}
            alg = header.get("alg")
        if isinstance(alg, str) and alg in self._hmac:
            key, algorithms = s.jwt_secret, [alg]
        elif isinstance(alg, str) and alg in self._asym:
            key, algorithms = s.jwt_public_key, [alg]
        else:
            return None, "algorithm", {"alg": alg[:32] if isinstance(alg, str) else None}
        try:
            claims = jwt.decode(
                token, key, algorithms=algorithms, options=self._options, leeway=s.jwt_leeway,
                audience=s.jwt_audience, issuer=s.jwt_issuer,
            )
        except jwt.InvalidSignatureError:
            return None, "bad_signature", {"alg": alg}
        except jwt.ExpiredSignatureError:
            return None, "expired", self._verified_user(token, key, algorithms)
        except jwt.MissingRequiredClaimError as exc:
            return None, "missing_claim", {"claim": exc.claim, **self._verified_user(token, key, algorithms)}
        except jwt.ImmatureSignatureError:
            return None, "not_yet_valid", self._verified_user(token, key, algorithms)
        except jwt.InvalidAudienceError:
            return None, "wrong_audience", self._verified_user(token, key, algorithms)
        except jwt.InvalidIssuerError:
            return None, "wrong_issuer", self._verified_user(token, key, algorithms)
        except jwt.InvalidIssuedAtError:
            return None, "invalid_claim", {"claim": "iat", **self._verified_user(token, key, algorithms)}
        except (jwt.PyJWTError, ValueError, TypeError):
            return None, "malformed", {}
        return claims, "", {}

    def _accept(self, token: str, claims: Dict[str, Any]) -> Tuple[Optional[Principal], str, Dict[str, Any]]:
        """The checks of tornado-rt's own on verified claims (token type, user claim)."""
        s = self.settings
        user_id = normalize_id(claims.get(s.jwt_user_claim))
        token_type = claims.get("token_type")
        if token_type is not None and token_type != "access":
            return None, "refresh_token" if token_type == "refresh" else "invalid_claim", \
                {"claim": "token_type", "user_id": user_id}
        if user_id is None:
            if s.jwt_user_claim not in claims:
                return None, "missing_claim", {"claim": s.jwt_user_claim}
            return None, "invalid_claim", {"claim": s.jwt_user_claim}
        principal = Principal(user_id, claims)
        self._remember(token, principal, claims)
        return principal, "", {}

    def _fast_decode(self, token: str) -> Optional[Dict[str, Any]]:
        """The claims of ``token`` when PyJWT's decode (with this authenticator's options) would
        certainly accept it, else None, and :meth:`_full_check` decides (and names the reason).

        The same checks as PyJWT 2.x, for the shape every issuer uses (HMAC, a header of ``alg``
        and ``typ`` only): three segments of canonical unpadded base64url, the header's ``alg``
        one of the allowed HMAC algorithms, the signature (``hmac.compare_digest``), the payload a
        JSON object (the same ``json.loads``), ``exp`` present, ``iat``/``nbf`` not in the future
        and ``exp`` not past (``int()`` of a number, with ``jwt_leeway``), no ``aud`` (no audience
        is configured, else this path is off), ``sub``/``jti`` strings when present. Anything
        else, even what PyJWT might accept, goes the full way: this path only ever says yes."""
        if _TOKEN_SHAPE.fullmatch(token) is None:
            return None
        head, _, rest = token.partition(".")
        body, _, crypto = rest.partition(".")
        alg = self._headers.get(head)
        if alg is None:
            alg = self._read_header(head)
            if alg is None:
                return None
        try:
            signature = _b64(crypto)
            payload = _b64(body)
        except ValueError:
            return None
        mac = self._fast[alg].copy()
        mac.update(token[:len(head) + 1 + len(body)].encode("ascii"))
        if not hmac.compare_digest(mac.digest(), signature):
            return None  # the full check names it (bad signature, or anything before it)
        try:
            claims = json.loads(payload)
        except (ValueError, RecursionError):
            return None
        if type(claims) is not dict or claims.get("exp") is None or "aud" in claims:
            return None
        now = time.time()  # PyJWT's clock: datetime.now(timezone.utc).timestamp()
        leeway = float(self.settings.jwt_leeway)
        try:
            for name in ("iat", "nbf", "exp"):
                if name in claims:
                    value = claims[name]
                    if type(value) is not int and type(value) is not float:
                        return None
                    if name == "exp":
                        if int(value) <= now - leeway:
                            return None
                    elif int(value) > now + leeway:
                        return None
        except (ValueError, OverflowError):
            return None
        for name in ("sub", "jti"):
            if name in claims and type(claims[name]) is not str:
                return None
        return claims

    def _read_header(self, segment: str) -> Optional[str]:
        """The algorithm of a header segment the fast decode takes (``{"alg": <fast HMAC>}``
        plus at most ``typ``, canonical base64url), remembered; else None."""
        try:
            header = json.loads(_b64(segment))
        except (ValueError, RecursionError):
            return None
        if type(header) is not dict or not set(header) <= {"alg", "typ"}:
            return None
        alg = header.get("alg")
        if type(alg) is not str or alg not in self._fast:
            return None
        if len(self._headers) < 64:
            self._headers[segment] = alg
        return alg

    def _remember(self, token: str, principal: Principal, claims: Dict[str, Any]) -> None:
        if not self.cache_size:
            return
        try:  # PyJWT: expired once int(exp) <= now - leeway
            expires = int(claims["exp"]) + float(self.settings.jwt_leeway)
        except (KeyError, TypeError, ValueError, OverflowError):
            return
        verified = self._verified
        verified[token] = (principal, expires)
        if len(verified) > self.cache_size:
            verified.popitem(last=False)

    def _verified_user(self, token: str, key: Any, algorithms: list) -> Dict[str, Any]:
        """``{"user_id": id}`` of a token whose signature verifies but whose claims were refused
        (so the id is the issuer's, not an attacker's); ``{}`` otherwise."""
        try:
            claims = jwt.decode(token, key, algorithms=algorithms,
                                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                                         "verify_aud": False, "verify_iss": False})
        except (jwt.PyJWTError, ValueError, TypeError):
            return {}
        user_id = normalize_id(claims.get(self.settings.jwt_user_claim))
        return {} if user_id is None else {"user_id": user_id}


_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: base64url -> base64 as a byte table: ``bytes.translate`` with a table is one C pass, where
#: ``str.translate`` with a dict looks every character up (about 2 us more per segment).
_TO_B64 = bytes.maketrans(b"-_", b"+/")
_PADDING = (b"", b"", b"==", b"=")  # by length mod 4 (1 is refused)


def _b64(segment: str) -> bytes:
    """An unpadded base64url segment (its alphabet already checked), decoded; ValueError unless
    it is canonical: PyJWT refuses a segment whose re-encoding differs, which for an unpadded
    segment of the alphabet means a length of 1 mod 4 or unused trailing bits that are not zero."""
    rest = len(segment) % 4
    if rest == 1:
        raise ValueError("bad length")
    if rest and _B64URL.index(segment[-1]) & (0x0F if rest == 2 else 0x03):
        raise ValueError("not canonical")
    try:
        return binascii.a2b_base64(segment.encode("ascii").translate(_TO_B64) + _PADDING[rest])
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(str(exc)) from None


def _fast_hmacs(settings: Settings) -> Dict[str, Any]:
    """alg -> ``hmac`` object keyed with ``jwt_secret``, for the allowed HMAC algorithms whose key
    PyJWT itself prepares without complaint (not PEM-like, and long enough that PyJWT has no
    key-length warning to give on every decode). Empty when PyJWT's algorithm objects differ."""
    fast: Dict[str, Any] = {}
    if not settings.jwt_secret:
        return fast
    try:
        from jwt.algorithms import HMACAlgorithm, get_default_algorithms
        algorithms = get_default_algorithms()
    except ImportError:
        return fast
    for name in settings.jwt_algorithms:
        algorithm = algorithms.get(name)
        if name not in HMAC_ALGORITHMS or not isinstance(algorithm, HMACAlgorithm):
            continue
        try:
            key = algorithm.prepare_key(settings.jwt_secret)
            check = getattr(algorithm, "check_key_length", None)
            if check is not None and check(key):
                continue
            fast[name] = hmac.new(key, digestmod=algorithm.hash_alg)
        except Exception:  # PyJWT refuses this key: its own path reports it
            continue
    return fast


def _peek_alg(token: str) -> Any:
    """The ``alg`` of a token's header, read cheaply (the header segment only); None when it
    cannot be read this way. Only picks the key: ``jwt.decode`` then parses and checks the whole
    token (every segment, the header's ``alg`` against the one allowed algorithm) itself."""
    segment = token.partition(".")[0]
    try:
        header = ujson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except Exception:  # anything odd: PyJWT's own parse decides (see JWTAuthenticator.check)
        return None
    return header.get("alg") if isinstance(header, dict) else None


def refuse_token(reason: str, **context: Any) -> None:
    """Count and log one refused token (kind ``token``; see :mod:`tornado_rt.refusals`).

    The JWT authenticator calls it with its reason; the connection calls it for the refusals it
    decides itself (``missing``, ``anonymous_disabled``, ``no_authenticator``,
    ``authenticator_refused``). Never pass the token.
    """
    refuse("token", reason, **context)


def to_principal(result: AuthResult) -> Optional[Principal]:
    """Accept what an authenticator may return: a Principal, a bare user id, or None."""
    if result is None or isinstance(result, Principal):
        return result
    user_id = normalize_id(result)
    return Principal(user_id) if user_id is not None else None


def log_authenticator_error(token: Optional[str]) -> None:
    """Log the exception being handled by an authenticator's caller, with ``token`` redacted:
    the embedder's exception may quote the token, and tokens never reach a log."""
    text = redact_secret(traceback.format_exc().rstrip(), token)
    log.error("authenticator raised; connection refused\n%s", text)
    refuse_token("authenticator_error")
