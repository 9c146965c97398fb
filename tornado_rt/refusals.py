"""Refusals made visible to the operator: one call counts a refusal and logs it, rate-limited.

:func:`refuse` is the one entry point::

    refuse("token", "expired", user_id=7)
    refuse("subscription", "not_a_member", level=logging.INFO, key=web_socket_id,
           page="table", table_id=10, user_id=7)
    refuse("frame", "not_json", level=logging.DEBUG, key=web_socket_id)

* ``kind`` says what was refused (``token``, ``subscription``, ``frame``, ...) and ``reason`` why,
  as a short code (``expired``, ``bad_signature``, ...). Both become the labels of the Prometheus
  counter ``tornado_rt_refusals_total{kind, reason}`` (exposed on ``/metrics`` by
  :mod:`tornado_rt.httpapi`). Every refusal is counted, including those whose log line is
  suppressed.
* The log line goes to the logger ``tornado_rt.refusals`` at ``level`` (INFO by default):
  ``refused token: reason=expired user_id=7``. The context is written as ``key=value`` pairs in
  the order given, values with ``repr`` for strings so that a hostile value cannot forge a line.
  Never pass a credential: a context key that names one (``token``, ``jwt_token``, ``api_key``,
  ...) raises ``ValueError`` so the mistake shows up in the first test, not in a log.
* Logging must not become an amplifier: at most :attr:`Refusals.per_second` lines per second in
  total, and at most :attr:`Refusals.per_key_per_second` per ``key`` (e.g. one connection's
  ``web_socket_id``) when a key is given. Lines over either limit are dropped and counted; when
  the second ends, one WARNING line says how many were suppressed, by kind.

The counts are per process (module-level :data:`REFUSALS`), like Prometheus's default registry:
several servers in one process add up. :meth:`Refusals.counts` returns a snapshot.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

from .redaction import CREDENTIAL_ARGUMENTS, REDACTED

log = logging.getLogger("tornado_rt.refusals")

#: Context keys that could carry a credential; :func:`refuse` refuses them. The same set as the
#: query arguments redaction hides (one list: redaction.CREDENTIAL_ARGUMENTS).
FORBIDDEN_CONTEXT = CREDENTIAL_ARGUMENTS

#: The reasons a token is refused, with what each means (docs/protocol.md lists them too).
TOKEN_REASONS: Dict[str, str] = {
    "missing": "no jwt_token query argument, or an empty one",
    "too_long": "longer than Settings.max_token_length",
    "malformed": "not a JWT: the header or payload does not decode",
    "algorithm": "the alg of the header is not in the allow-list (including none)",
    "bad_signature": "the signature does not verify with the configured key",
    "expired": "exp is in the past (beyond jwt_leeway)",
    "not_yet_valid": "nbf or iat is in the future",
    "missing_claim": "a required claim is absent: exp, the user claim, or aud/iss when configured",
    "wrong_audience": "aud does not match Settings.jwt_audience",
    "wrong_issuer": "iss does not match Settings.jwt_issuer",
    "invalid_claim": "a claim has a value of the wrong type (e.g. a user claim that is not an id)",
    "refresh_token": "token_type is present and is not access (e.g. a refresh token)",
    "anonymous_disabled": "jwt_token=anonymous while anonymous connections are off",
    "no_authenticator": "the server has no JWT key and no authenticator",
    "authenticator_error": "the authenticator raised (the traceback is logged, redacted)",
    "authenticator_refused": "an embedder's authenticator answered None",
}

#: Reason codes for refused subscriptions (``kind="subscription"``, INFO; with the page, its
#: parameters (made safe by :func:`safe_params`) and the user as context). Reported by the session.
SUBSCRIPTION_REASONS: Dict[str, str] = {
    "unknown_page_type": "no page type of that name is registered",
    "missing_parameter": "a required parameter of the page type is absent or null",
    "invalid_parameter": "a parameter value cannot be used (not an id, or a number JSON cannot carry)",
    "anonymous_not_allowed": "an anonymous connection asked for a page that needs a user",
    "unknown_table": "the built-in check: the table is not in the directory",
    "not_a_member": "the built-in check: the user is not a member of the table's workspace",
    "unknown_view": "the built-in check: no public view has this slug",
    "bad_token": "the built-in check: the token of a password-protected public view does not match",
    "access_denied": "the access check said no (a custom policy or page type; it gives no reason)",
    "access_error": "the access check raised (logged with its traceback)",
    "webhook_denied": "the access webhook answered allow: false (its reason, if any, is in the line)",
    "webhook_timeout": "the access webhook gave no decision in time",
    "webhook_error": "the access webhook could not be asked or answered something else than a decision",
    "too_many_subscriptions": "the connection already has max_subscriptions pages (then closed with 4008)",
}

#: Reason codes for ignored frames (``kind="frame"``, DEBUG).
FRAME_REASONS: Dict[str, str] = {
    "not_json": "the text frame is not valid JSON",
    "not_an_object": "the JSON is not an object",
    "no_action": "a JSON object with neither a page nor a remove_page key",
    "binary": "a binary frame",
}

#: Subscription reasons an error frame names as they are; every other one (what the access check
#: decided: ``unknown_table``, ``not_a_member``, ``bad_token``, a webhook's or an embedder's own
#: reason...) reads ``access_denied`` for the client: telling "no such table" apart from "not
#: yours" would let it probe which tables and views exist.
CLIENT_REASONS = frozenset({"unknown_page_type", "missing_parameter", "invalid_parameter", "anonymous_not_allowed",
                            "too_many_subscriptions", "access_denied"})


#: Context keys the session writes itself on a refused subscription's line.
RESERVED_CONTEXT = frozenset({"kind", "reason", "level", "key", "page", "parameters", "user_id"})


class Denied:
    """A refusal with a reason: what an access check may return instead of ``False``.

    It is falsy, so code that only asks "allowed?" keeps working; the session logs and counts its
    ``reason`` (one of :data:`SUBSCRIPTION_REASONS`, or a code of the embedder's own) and its
    ``context`` (``key=value`` pairs for the log line, values cut like a client's). An access
    check that answers a plain ``False`` is counted as ``access_denied``. A context key naming a
    credential (:data:`FORBIDDEN_CONTEXT`) or one the log line already has (:data:`RESERVED_CONTEXT`)
    raises ``ValueError`` here, in the access check (which then counts as ``access_error``).
    """

    __slots__ = ("reason", "context")

    def __init__(self, reason: str, **context: Any):
        bad = (FORBIDDEN_CONTEXT | RESERVED_CONTEXT).intersection(k.lower() for k in context)
        if bad:
            raise ValueError(f"Denied(): context key {sorted(bad)[0]!r} is a credential or already in the line")
        self.reason = reason
        self.context = context

    def __bool__(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Denied) and (other.reason, other.context) == (self.reason, self.context)

    def __hash__(self) -> int:
        return hash(self.reason)

    def __repr__(self) -> str:
        return f"Denied({self.reason!r})"


#: Longest string value of a client's parameter written to a log line (longer ones are cut).
MAX_VALUE_LENGTH = 64
#: Most parameters of one frame written to a log line.
MAX_PARAMS = 8


def safe_value(value: Any) -> Any:
    """A client's value made fit for a log line: strings cut at :data:`MAX_VALUE_LENGTH` characters
    (``'...'`` plus the full length appended), containers summarised, other values kept."""
    if isinstance(value, str):
        if len(value) <= MAX_VALUE_LENGTH:
            return value
        return f"{value[:MAX_VALUE_LENGTH]}...({len(value)} chars)"
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        text = str(value)
        return value if len(text) <= MAX_VALUE_LENGTH else f"{text[:MAX_VALUE_LENGTH]}...({len(text)} digits)"
    if isinstance(value, (dict, list, tuple)):
        return f"<{type(value).__name__} of {len(value)}>"
    return f"<{type(value).__name__}>"


def safe_params(params: Any) -> Dict[str, Any]:
    """A client's parameters made fit for a log line: at most :data:`MAX_PARAMS` of them, names and
    values passed through :func:`safe_value`, and the value of a parameter that names a credential
    (``token``, ...: :data:`FORBIDDEN_CONTEXT`) replaced by ``'[redacted]'`` (its presence stays
    visible, its value never reaches the log)."""
    if not isinstance(params, dict):
        return {}
    safe: Dict[str, Any] = {}
    for name, value in params.items():
        if len(safe) == MAX_PARAMS:
            safe["..."] = f"{len(params) - MAX_PARAMS} more"
            break
        key = str(safe_value(name))
        safe[key] = REDACTED if value is not None and key.lower() in FORBIDDEN_CONTEXT else safe_value(value)
    return safe


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    return repr(value)


class Refusals:
    """Counts refusals by ``(kind, reason)`` and logs them under a rate limit (see the module)."""

    def __init__(self, per_second: int = 20, per_key_per_second: int = 5,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger = log):
        self.per_second = per_second
        self.per_key_per_second = per_key_per_second
        self._clock = clock
        self._log = logger
        self._lock = threading.Lock()
        self._counts: Dict[Tuple[str, str], int] = {}
        self._window = -1  # the whole second the current counts of lines belong to
        self._lines = 0
        self._per_key: Dict[Hashable, int] = {}
        self._suppressed: Dict[str, int] = {}
        self._report_scheduled = False

    def counts(self) -> Dict[Tuple[str, str], int]:
        """``{(kind, reason): n}`` since start (a copy)."""
        with self._lock:
            return dict(self._counts)

    def count(self, kind: str, reason: str) -> int:
        with self._lock:
            return self._counts.get((kind, reason), 0)

    def refuse(self, kind: str, reason: str, *, level: int = logging.INFO, key: Optional[Hashable] = None,
               **context: Any) -> None:
        """Count one refusal and log it unless the rate limit says otherwise."""
        bad = FORBIDDEN_CONTEXT.intersection(k.lower() for k in context)
        if bad:
            raise ValueError(f"refuse(): never log a credential (context key {sorted(bad)[0]!r})")
        schedule = False
        with self._lock:
            self._counts[(kind, reason)] = self._counts.get((kind, reason), 0) + 1
            if not self._log.isEnabledFor(level):
                return
            report = self._roll()
            allowed = self._lines < self.per_second
            if allowed and key is not None:
                allowed = self._per_key.get(key, 0) < self.per_key_per_second
            if allowed:
                self._lines += 1
                if key is not None:
                    self._per_key[key] = self._per_key.get(key, 0) + 1
            else:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                schedule = not self._report_scheduled
                self._report_scheduled = True
        if report:
            self._report(report)
        if allowed:
            parts = [f"reason={reason}"] + [f"{k}={_format_value(v)}" for k, v in context.items()]
            self._log.log(level, "refused %s: %s", kind, " ".join(parts))
        elif schedule:
            self._schedule_report()

    # --- the per-second window ---------------------------------------------------------------------
    def _roll(self) -> Dict[str, int]:
        """Start a new window when the second changed; return what the last one suppressed.
        Called with the lock held."""
        window = int(self._clock())
        if window == self._window:
            return {}
        self._window = window
        self._lines = 0
        self._per_key.clear()
        suppressed, self._suppressed = self._suppressed, {}
        self._report_scheduled = False
        return suppressed

    def _report(self, suppressed: Dict[str, int]) -> None:
        total = sum(suppressed.values())
        by_kind = ", ".join(f"{kind}={n}" for kind, n in sorted(suppressed.items()))
        self._log.warning("%d refusal log lines suppressed in the last second (%s); "
                          "the counters on /metrics count every refusal", total, by_kind)

    def _schedule_report(self) -> None:
        """Report the suppressed lines when the window ends, even if no refusal follows."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on a loop: reported by the next refusal after the window
        delay = max(0.0, self._window + 1 - self._clock()) + 0.001
        loop.call_later(delay, self.flush)

    def flush(self) -> None:
        """Log the suppressed count of a finished window now (the timer calls this)."""
        with self._lock:
            report = self._roll() if int(self._clock()) != self._window else {}
        if report:
            self._report(report)


#: The process's refusals: what :func:`refuse` counts and ``/metrics`` exposes.
REFUSALS = Refusals()


def refuse(kind: str, reason: str, *, level: int = logging.INFO, key: Optional[Hashable] = None,
           **context: Any) -> None:
    """Count and log one refusal on :data:`REFUSALS` (see the module docstring)."""
    REFUSALS.refuse(kind, reason, level=level, key=key, **context)
