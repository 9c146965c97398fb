"""The access webhook: the application's backend decides who may subscribe to a page.

The "subscribe proxy" pattern of standalone real-time servers: for a page whose access is
``webhook``, tornado-rt asks ``POST <url>`` with the JSON body ::

    {"user_id": 10, "page": "dashboard", "parameters": {"dashboard_id": 7},
     "web_socket_id": "9f0c..."}

and the header ``Authorization: Bearer <api key>``. A ``200`` answer ``{"allow": true}`` admits
the subscription, ``{"allow": false}`` refuses it (no reply to the client, as for any refused
page; a short ``"reason"`` code beside it, e.g. ``{"allow": false, "reason": "suspended"}``, is
written into the refusal's log line: ``reason=webhook_denied ... webhook_reason='suspended'``).
Everything else refuses (fail closed) and is logged with its reason: a timeout, a refused
connection, another status, a body that is not JSON or whose ``allow`` is not a boolean.

Decisions (allow and deny, not failures) are cached for ``cache_ttl`` seconds per
(user, page, parameters); 0 disables the cache. With a cache the backend must not decide on the
``web_socket_id``. At most ``max_concurrency`` calls are in flight; more wait for a free slot, and
the wait counts against ``timeout`` (the whole decision never takes longer than ``timeout``).

For embedders: ``AccessWebhook(...).page_check("dashboard")`` is a ``can_add`` for a
:class:`~tornado_rt.PageType`; :meth:`AccessWebhook.guard` puts already registered page types
(the built-in ``table``, ``row``, ``view``) behind the webhook instead of their own check.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from .redaction import redact_secret, redact_url
from .refusals import Denied
from .registry import PageType, Params, Registry

log = logging.getLogger("tornado_rt.webhook")

#: Outcomes counted in :attr:`AccessWebhook.decisions` (and the metric
#: ``tornado_rt_access_webhook_decisions_total``).
OUTCOMES = ("allow", "deny", "cached_allow", "cached_deny", "timeout", "error")


class AccessWebhook:
    """Asks the backend at ``url`` whether a subscription is allowed (see the module docstring).

    ``api_key``: sent as ``Authorization: Bearer <api_key>`` (None: no header). ``timeout``:
    seconds for one decision, waiting for a free slot included (default 2). ``cache_ttl``: seconds
    a decision is reused (default 5; 0 = never). ``max_concurrency``: calls in flight at most
    (default 16). ``max_cache_entries``: oldest decisions are dropped beyond it (default 100000).
    """

    def __init__(self, url: str, api_key: Optional[str] = None, *, timeout: float = 2.0,
                 cache_ttl: float = 5.0, max_concurrency: int = 16, max_cache_entries: int = 100_000):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            shown = redact_url(url) if isinstance(url, str) else type(url).__name__
            raise ValueError(f"the access webhook URL must be http:// or https://, got {shown!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if cache_ttl < 0:
            raise ValueError("cache_ttl must not be negative")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.url = url
        #: The URL as every message shows it: a password in it (user:password@) never reaches a log.
        self.shown_url = redact_url(url)
        self._password = urlsplit(url).password
        self.timeout = float(timeout)
        self.cache_ttl = float(cache_ttl)
        self.max_concurrency = max_concurrency
        self.max_cache_entries = max_cache_entries
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._cache: "collections.OrderedDict[Tuple[Any, str, str], Tuple[float, bool, Optional[str]]]" = \
            collections.OrderedDict()
        self._semaphore: Optional[asyncio.Semaphore] = None
        self._client: Optional[AsyncHTTPClient] = None
        #: Decisions since start, by outcome (see :data:`OUTCOMES`).
        self.decisions: Dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        #: Calls to the backend in flight right now.
        self.in_flight = 0

    # --- page access checks -----------------------------------------------------------------------
    def page_check(self, page: str) -> Callable[..., Any]:
        """A ``can_add(principal, params, policy, *, web_socket_id)`` asking this webhook about
        page type ``page``."""
        async def can_add(principal: Any, params: Params, policy: Any, *,
                          web_socket_id: Optional[str] = None) -> Any:
            allowed, reason, context = await self._decide(principal.user_id, page, params, web_socket_id)
            return True if allowed else Denied(reason, **context)
        can_add.__qualname__ = f"AccessWebhook.page_check({page!r})"
        return can_add

    def guard(self, registry: Registry, page_names: Iterable[str]) -> None:
        """Replace the access check of these registered page types by this webhook (a copy of each
        page type is registered in its place: the plugin's own objects stay untouched).
        Raises ``ValueError`` naming an unknown page type."""
        for name in page_names:
            pt = registry.page_type(name)
            if pt is None:
                raise ValueError(f"page type {name!r} is not registered (known: {', '.join(sorted(registry.page_types))})")
            registry.page_types[name] = PageType(
                pt.name, pt.parameters, pt._group, self.page_check(pt.name), pt._permission_group,
                required=pt.required, anonymous=pt.anonymous)

    # --- the decision ---------------------------------------------------------------------------
    async def decide(self, user_id: Any, page: str, params: Params, web_socket_id: Optional[str] = None) -> bool:
        """Whether ``user_id`` may subscribe to ``page`` with ``params`` (False on any failure)."""
        return (await self._decide(user_id, page, params, web_socket_id))[0]

    async def _decide(self, user_id: Any, page: str, params: Params,
                      web_socket_id: Optional[str]) -> Tuple[bool, str, Dict[str, Any]]:
        """``(allowed, refusal reason, context for the refusal's log line)``: the reason is
        ``webhook_denied`` (context: the backend's ``reason`` when it gave a short code),
        ``webhook_timeout`` or ``webhook_error``."""
        key = (user_id, page, json.dumps(params, sort_keys=True, default=str))
        if self.cache_ttl > 0:
            hit = self._cache.get(key)
            if hit is not None:
                expires, allowed, why = hit
                if expires > time.monotonic():
                    self.decisions["cached_allow" if allowed else "cached_deny"] += 1
                    return allowed, "webhook_denied", _why(why)
                del self._cache[key]
        body = json.dumps({"user_id": user_id, "page": page, "parameters": params, "web_socket_id": web_socket_id})
        try:
            async with asyncio.timeout(self.timeout):
                allowed, why = await self._call(body)
        except TimeoutError:
            self.decisions["timeout"] += 1
            log.warning("access webhook: no decision within %g s for page %r of user %r: refused",
                        self.timeout, page, user_id)
            return False, "webhook_timeout", {}
        except _Refusal as exc:
            self.decisions["error"] += 1
            log.warning("access webhook: %s (page %r, user %r): refused", exc, page, user_id)
            return False, "webhook_error", {}
        self.decisions["allow" if allowed else "deny"] += 1
        if not allowed:
            log.info("access webhook denied page %r to user %r", page, user_id)
        if self.cache_ttl > 0:
            self._cache[key] = (time.monotonic() + self.cache_ttl, allowed, why)
            while len(self._cache) > self.max_cache_entries:
                self._cache.popitem(last=False)
        return allowed, "webhook_denied", _why(why)

    async def _call(self, body: str) -> Tuple[bool, Optional[str]]:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
            self._client = AsyncHTTPClient(force_instance=True, max_clients=self.max_concurrency)
        assert self._client is not None
        async with self._semaphore:
            self.in_flight += 1
            try:
                # The decision's deadline is the asyncio timeout around this call; Tornado's own
                # timeouts are only a backstop that frees the connection soon after it.
                request = HTTPRequest(self.url, method="POST", body=body, headers=self._headers,
                                      connect_timeout=self.timeout + 1, request_timeout=self.timeout + 1,
                                      follow_redirects=False)
                try:
                    response = await self._client.fetch(request, raise_error=False)
                except Exception as exc:  # DNS, refused connection, TLS...
                    raise _Refusal(f"cannot reach {self.shown_url}: {self._safe(exc)}") from None
            finally:
                self.in_flight -= 1
        if response.code == 599:
            raise _Refusal(f"cannot reach {self.shown_url}: {self._safe(response.error)}")
        if response.code != 200:
            raise _Refusal(f"{self.shown_url} answered HTTP {response.code}")
        try:
            answer = json.loads(response.body or b"")
        except ValueError:
            raise _Refusal(f"{self.shown_url} answered a body that is not JSON") from None
        allow = answer.get("allow") if isinstance(answer, dict) else None
        if not isinstance(allow, bool):
            raise _Refusal(f"{self.shown_url} answered without a boolean \"allow\"")
        why = answer.get("reason")
        return allow, why if isinstance(why, str) and _REASON.fullmatch(why) else None

    def _safe(self, error: Any) -> str:
        """An error's text for a log line: the URL and its password (if any) never in it."""
        return redact_secret(str(error).replace(self.url, self.shown_url), self._password)

    def close(self) -> None:
        """Close the HTTP client (the webhook can be used again afterwards)."""
        if self._client is not None:
            self._client.close()
        self._client = None
        self._semaphore = None


#: A reason the backend may give with ``allow: false``: a short code, logged as it is.
_REASON = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _why(reason: Optional[str]) -> Dict[str, Any]:
    return {} if reason is None else {"webhook_reason": reason}


class _Refusal(Exception):
    """A failed call to the backend (the reason is logged, the subscription refused)."""
