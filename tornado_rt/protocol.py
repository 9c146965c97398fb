"""What a client message means (docs/protocol.md §2), kept apart from sockets.

:class:`ClientProtocol` reads one incoming text frame for one connection and acts on the hub:
subscribe (``page``) after the page type's access check, unsubscribe (``remove_page``), and the
``page_add`` / ``page_discard`` replies. Anything that is not a JSON object with a string ``page``
or ``remove_page`` is ignored, as Baserow does; an unknown page type, a denied access check or a
missing required parameter gets no reply at all.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, List, Optional, Tuple

import ujson

from .hub import Hub
from .policy import AccessPolicy
from .registry import PageType, Registry
from .router import Subscription, page_frame

log = logging.getLogger("tornado_rt.protocol")

Action = Tuple[str, PageType, dict]


def parse(registry: Registry, text: Any) -> List[Action]:
    """The page actions of one client frame: ``[("page" | "remove_page", page type, params)]``.

    ``page`` comes before ``remove_page`` when a frame holds both. Garbage gives ``[]``.
    """
    if not isinstance(text, str):
        return []
    try:
        obj = ujson.loads(text)
    except (ValueError, OverflowError, RecursionError):
        return []
    if type(obj) is not dict:
        return []
    actions: List[Action] = []
    for key in ("page", "remove_page"):
        if key in obj:
            page_type = registry.page_type(obj[key])
            if page_type is not None:
                params = page_type.params_from(obj)
                if not _json_safe(params):
                    return []  # e.g. 1e999 or NaN: echoed back it would not be JSON
                actions.append((key, page_type, params))
    return actions


def _json_safe(params: dict) -> bool:
    """Whether ``params`` can be echoed as JSON (ujson reads 1e999 as inf and NaN as nan)."""
    try:
        ujson.dumps(params, allow_nan=False)
    except (OverflowError, ValueError):
        return False
    return True


class ClientProtocol:
    """Applies client page actions for connections of one server."""

    def __init__(self, registry: Registry, policy: AccessPolicy, hub: Hub, max_subscriptions: int):
        self.registry = registry
        self.policy = policy
        self.hub = hub
        self.max_subscriptions = max_subscriptions

    def handle(self, conn: Any, text: Any) -> Optional[Awaitable[None]]:
        """Handle one frame. Returns an awaitable only when an access check is asynchronous;
        the caller must await it before handling the connection's next frame."""
        actions = parse(self.registry, text)
        for i, (kind, page_type, params) in enumerate(actions):
            if kind == "page":
                pending = self.add_page(conn, page_type, params)
                if pending is not None:
                    return self._finish(pending, conn, actions[i + 1:])
            else:
                self.remove_page(conn, page_type, params)
        return None

    async def _finish(self, pending: Awaitable[None], conn: Any, rest: List[Action]) -> None:
        await pending
        for kind, page_type, params in rest:
            if kind == "remove_page":
                self.remove_page(conn, page_type, params)

    def add_page(self, conn: Any, page_type: PageType, params: dict) -> Optional[Awaitable[None]]:
        principal = conn.principal
        if principal.user_id is None and not page_type.anonymous:
            return None
        if page_type.missing(params) is not None:
            return None
        try:
            allowed = page_type.check(principal, params, self.policy, getattr(conn, "web_socket_id", None))
        except Exception:
            log.exception("access check of page %r failed; subscription refused", page_type.name)
            return None
        if inspect.isawaitable(allowed):
            return self._add_when_allowed(conn, page_type, params, allowed)
        if allowed:
            self._subscribe(conn, page_type, params)
        return None

    async def _add_when_allowed(self, conn: Any, page_type: PageType, params: dict, allowed: Awaitable) -> None:
        try:
            ok = await allowed
        except Exception:
            log.exception("access check of page %r failed; subscription refused", page_type.name)
            return
        if ok and conn.stream is not None:
            self._subscribe(conn, page_type, params)

    def _subscribe(self, conn: Any, page_type: PageType, params: dict) -> None:
        group = page_type.group(params)
        if group not in conn.pages and len(conn.pages) >= self.max_subscriptions:
            conn.violate("too many subscriptions")
            return
        self.hub.subscribe(conn, group, Subscription(page_type, params))
        self.hub.send(conn, page_frame("page_add", page_type.name, params))

    def remove_page(self, conn: Any, page_type: PageType, params: dict) -> None:
        if page_type.missing(params) is None:
            self.hub.unsubscribe(conn, page_type.group(params))
        self.hub.send(conn, page_frame("page_discard", page_type.name, params))
