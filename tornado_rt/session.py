"""The session: one connection's protocol logic, without I/O (sans-I/O).

A :class:`Session` is what the hub indexes. It holds the connection's state (:class:`State`),
its principal, its subscriptions (``pages``), its heartbeat and incoming-rate state, and ``out``,
the frames queued for it and not yet written. It reads client frames and decides: authentication,
``page`` / ``remove_page`` (docs/protocol.md §2), the limits, and when to close. It never touches a
socket: frames go to ``out`` (through the hub, which schedules one flush per loop iteration)
and a close is asked of its ``transport`` (the :class:`~tornado_rt.transport.Transport` of the
Tornado adapter, or anything with ``close(code, reason)``, ``abort()``, ``gone()`` and, for the
hub, ``flush()``).

Entry points, one per event of the connection:

* :meth:`authenticate` ``(token)``: once, when the WebSocket is open.
* :meth:`receive_frame` ``(opcode, data)``: every frame the transport hands over.
* :meth:`ping` / :meth:`ping_timed_out`: the shared heartbeat.
* :meth:`close` / :meth:`drop`: the server closes it (with a close frame / at once).
* :meth:`closing` and :meth:`connection_lost`: the transport reports the closing handshake
  and the end of the TCP connection.

Each returns None, or an awaitable when an application hook answered asynchronously; the caller
waits for it before feeding the next frame (Tornado does so with ``on_message``'s result).
"""
from __future__ import annotations

import enum
import logging
import os
import time
from typing import Any, Awaitable, Callable, Dict, Optional

import ujson

from . import closecodes
from .auth import refuse_token
from .hooks import Hooks, pending, then
from .hub import Hub, text_frame
from .principal import ANONYMOUS, Principal
from .protocol import parse
from .refusals import (CLIENT_REASONS, FRAME_REASONS, MAX_PARAMS, SUBSCRIPTION_REASONS, Denied, refuse, safe_params,
                       safe_value)
from .registry import PageType, Registry
from .router import Subscription, page_frame

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_AUTH_FAILED = text_frame(b'{"type":"authentication","success":false,"web_socket_id":null}')
PING_FRAME = b"\x89\x00"  # an empty ping frame: the same bytes for every connection


class State(enum.IntEnum):
    AUTHENTICATING = 0  # open at the WebSocket level, waiting for the authenticator
    OPEN = 1            # authenticated and in the hub
    CLOSING = 2         # a close frame was sent or asked for, or the connection is being dropped
    CLOSED = 3          # the TCP connection is gone


class SessionContext:
    """What every session of one server shares: the hub, the application's hooks, the registry,
    the limits, and the server's callbacks for a session that opens or leaves. ``closing``:
    the server is shutting down (no new session opens)."""

    __slots__ = ("hub", "hooks", "registry", "policy", "max_subscriptions", "max_incoming_rate",
                 "max_incoming_burst", "max_message_size", "allow_anonymous",
                 "max_connections_per_user", "error_frames", "closing", "opened", "left", "auth_failed",
                 "recovery", "presence")

    def __init__(self, hub: Hub, hooks: Hooks, registry: Registry, settings: Any,
                 opened: Callable[["Session"], None] = lambda s: None,
                 left: Callable[["Session"], None] = lambda s: None,
                 auth_failed: Callable[[], None] = lambda: None):
        self.hub = hub
        self.hooks = hooks
        self.registry = registry
        self.policy = hooks.policy
        self.max_subscriptions = settings.max_subscriptions
        self.max_incoming_rate = settings.max_incoming_rate
        self.max_incoming_burst = settings.max_incoming_burst
        self.max_message_size = settings.max_message_size
        self.allow_anonymous = settings.allow_anonymous
        self.max_connections_per_user = settings.max_connections_per_user
        self.error_frames = getattr(settings, "error_frames", False)
        self.closing = False
        self.opened = opened
        self.left = left
        self.auth_failed = auth_failed
        self.recovery: Any = None  # history.Recovery when the recovery extension is on
        self.presence: Any = None  # presence.Presence (the ``presence`` client action uses it)


def _uuid4() -> str:
    """``str(uuid.uuid4())`` (16 random bytes, the version and variant bits set as RFC 4122
    section 4.4 says) without the UUID object: about half the cost, once per connection."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


class Session:
    """One connection's protocol state; see the module docstring."""

    __slots__ = ("ctx", "transport", "state", "web_socket_id", "principal", "user_id", "pages",
                 "out", "closed_by", "awaiting_pong", "positions", "_tokens", "_refilled", "__weakref__")

    def __init__(self, ctx: SessionContext, transport: Any = None):
        self.ctx = ctx
        self.transport = transport
        self.state = State.AUTHENTICATING
        self.web_socket_id: Optional[str] = None
        self.principal: Optional[Principal] = None
        self.user_id: Any = None
        self.pages: Dict[str, Subscription] = {}
        self.out: list = []  # frames queued, not yet written (the hub appends, the transport drains)
        self.closed_by: Any = None  # close code, or "ping_timeout"; None: the client closed
        self.awaiting_pong = False
        #: Opened with ``positions=1`` (recovery extension): set by the adapter before authentication.
        self.positions = False
        self._tokens = float(ctx.max_incoming_burst)
        self._refilled = 0.0

    @property
    def disconnected(self) -> bool:
        """Whether the TCP connection is gone."""
        return self.state is State.CLOSED

    def data_to_send(self) -> list:
        """Take the queued frames (for a caller without a transport, e.g. a test)."""
        frames = list(self.out)
        self.out.clear()
        return frames

    # --- authentication ---------------------------------------------------------------------------
    def authenticate(self, token: Optional[str]) -> Optional[Awaitable[None]]:
        """Decide who this is: ``anonymous`` by the setting, anything else by the authenticator."""
        ctx = self.ctx
        if token == "anonymous":
            if not ctx.allow_anonymous:
                refuse_token("anonymous_disabled")
            self._authenticated(ANONYMOUS if ctx.allow_anonymous else None)
            return None
        if not token or ctx.hooks.authenticator is None:
            refuse_token("missing" if not token else "no_authenticator")
            self._authenticated(None)
            return None
        return pending(then(ctx.hooks.authenticate(token), self._authenticated))

    def _authenticated(self, principal: Optional[Principal]) -> None:
        ctx = self.ctx
        hub = ctx.hub
        if self.state is not State.AUTHENTICATING or (self.transport is not None and self.transport.gone()):
            return  # the client left while the authenticator was thinking
        if principal is not None and principal.user_id is None and not ctx.allow_anonymous:
            refuse_token("anonymous_disabled")
            principal = None  # an embedder's authenticator answered "anonymous": same switch
        if principal is None:
            ctx.auth_failed()
            hub.send(self, _AUTH_FAILED)
            self.close(closecodes.AUTHENTICATION_FAILED, "authentication failed")
            return
        if ctx.closing:  # the server began shutting down meanwhile
            self.close(closecodes.GOING_AWAY, "server shutting down")
            return
        limit = ctx.max_connections_per_user
        if limit and principal.user_id is not None and len(hub.users.get(principal.user_id, ())) >= limit:
            self.close(closecodes.TRY_AGAIN_LATER, "too many connections for this user")
            return
        self.principal = principal
        self.user_id = principal.user_id
        self.web_socket_id = _uuid4()
        self.state = State.OPEN
        self._refilled = time.monotonic()
        hub.add(self)
        ctx.opened(self)
        # a uuid needs no JSON escaping: the bytes of ujson.dumps({"type": ..., "web_socket_id": id})
        hub.send(self, text_frame(b'{"type":"authentication","success":true,"web_socket_id":"%s"}'
                                  % self.web_socket_id.encode("ascii")))

    # --- incoming frames ----------------------------------------------------------------------------
    def receive_frame(self, opcode: int, data: Any) -> Optional[Awaitable[None]]:
        """One frame from the client: the one entry point for every incoming frame, so the
        incoming rate counts every kind (close 4008 past it). The transport's frame reader hands
        over each frame: a fragment that is not its message's last as ``CONTINUATION`` (counted
        only), the last one as the whole message (``TEXT`` as str, ``BINARY``), ``PING``,
        ``PONG`` and ``CLOSE`` (counted; the transport answers pings and closes). Frames that
        break RFC 6455 never get here (the transport answers them with 1002 / 1007). With
        Tornado's public API only (the fallback) whole messages, pings and pongs are counted."""
        if opcode == PONG:
            self.awaiting_pong = False
        if self.state is not State.OPEN:
            return None
        ctx = self.ctx
        data_frame = opcode == TEXT or opcode == BINARY
        if data_frame and len(data) > ctx.max_message_size:
            self.close(closecodes.MESSAGE_TOO_BIG, "message too big")
            return None
        if ctx.max_incoming_rate:
            now = time.monotonic()
            tokens = min(ctx.max_incoming_burst, self._tokens + (now - self._refilled) * ctx.max_incoming_rate)
            self._refilled = now
            if tokens < 1:
                self.close(closecodes.POLICY_VIOLATION, "too many messages")
                return None
            self._tokens = tokens - 1
        if opcode == BINARY:
            self._refused("frame", "binary", {})
            return None
        if opcode != TEXT:
            return None  # control and continuation frames: counted, nothing to act on
        actions = parse(ctx.registry, data, self._refused)
        if not actions:
            return None
        kind, page_type, params, frame = actions[0]
        if kind == "remove_page":
            self._remove_page(page_type, params)
            return None
        if kind != "page":  # a client action of a plugin (e.g. presence); may answer later
            return pending(ctx.registry.actions[kind].handle(self, page_type, params, frame))
        rest = actions[1:]

        def remove_rest(_: Any) -> None:  # after the page's access check, whenever it answers
            for _kind, other_type, other_params, _frame in rest:
                self._remove_page(other_type, other_params)
        return pending(then(self._add_page(page_type, params, frame), remove_rest))

    def _add_page(self, page_type: PageType, params: dict, frame: Optional[dict] = None) -> Any:
        principal = self.principal
        assert principal is not None
        if principal.user_id is None and not page_type.anonymous:
            self._refused_page("anonymous_not_allowed", page_type, params)
            return None
        missing = page_type.missing(params)
        if missing is not None:
            self._refused_page("missing_parameter", page_type, params, parameter=missing)
            return None
        ctx = self.ctx
        allowed = ctx.hooks.can_add(page_type, principal, params, ctx.policy, self.web_socket_id)
        return then(allowed, lambda ok: self._subscribe(page_type, params, frame) if ok
                    else self._denied(page_type, params, ok))

    def _denied(self, page_type: PageType, params: dict, answer: Any) -> None:
        """The access check said no: a :class:`~tornado_rt.refusals.Denied` names its reason, any
        other falsy answer is ``access_denied``."""
        if self.state is not State.OPEN:
            return  # closed while an asynchronous access check was pending
        if isinstance(answer, Denied):
            self._refused_page(answer.reason, page_type, params, **answer.context)
        else:
            self._refused_page("access_denied", page_type, params)

    def _subscribe(self, page_type: PageType, params: dict, frame: Optional[dict] = None) -> Any:
        if self.state is not State.OPEN:
            return  # closed while an asynchronous access check was pending
        group = page_type.group(params)
        if group not in self.pages and len(self.pages) >= self.ctx.max_subscriptions:
            self._refused_page("too_many_subscriptions", page_type, params, limit=self.ctx.max_subscriptions)
            self.close(closecodes.POLICY_VIOLATION, "too many subscriptions")
            return
        ready = self.ctx.hub.ready(group)
        if ready is not None:  # the broker registers this process for the group first (Redis routing)
            return then(ready, lambda _: self._join(page_type, params, group, frame))
        return self._join(page_type, params, group, frame)

    def _join(self, page_type: PageType, params: dict, group: str, frame: Optional[dict]) -> Any:
        if self.state is not State.OPEN:
            return None  # closed while the broker registered the group
        hub = self.ctx.hub
        hub.subscribe(self, group, Subscription(page_type, params))
        recovery = self.ctx.recovery
        if self.positions and recovery is not None:  # the recovery extension (tornado_rt.history)
            return recovery.subscribed(self, group, page_type.name, params, frame or {})
        hub.send(self, page_frame("page_add", page_type.name, params))
        return None

    # --- refusals (docs/protocol.md, "Refusals in the operator's view" and "Error frames") ----------
    def _refused(self, kind: str, reason: str, context: dict) -> None:
        """A frame ignored (``kind="frame"``, DEBUG) or a page refused before its page type was
        known (``kind="subscription"``; ``context`` holds the client's raw ``page`` and
        ``parameters``): count it, log it (rate-limited, values made safe), and tell the client
        when error frames are on."""
        if kind == "frame":
            refuse("frame", reason, level=logging.DEBUG, key=self.web_socket_id, user_id=self.user_id,
                   **{k: [safe_value(x) for x in v[:MAX_PARAMS]] if isinstance(v, list) else safe_value(v)
                      for k, v in context.items()})
            self._error_frame(reason, FRAME_REASONS.get(reason, reason))
            return
        self._refuse_subscription(reason, context.get("page"), context.get("parameters"))

    def _refused_page(self, reason: str, page_type: PageType, params: dict, **context: Any) -> None:
        self._refuse_subscription(reason, page_type.name, params, **context)

    def _refuse_subscription(self, reason: str, page: Any, params: Any, **context: Any) -> None:
        refuse("subscription", reason, key=self.web_socket_id, page=safe_value(page),
               parameters=safe_params(params), user_id=self.user_id,
               **{k: safe_value(v) for k, v in context.items()})
        code = reason if reason in CLIENT_REASONS else "access_denied"
        self._error_frame(code, SUBSCRIPTION_REASONS.get(code, "the subscription was refused"), page)

    def _error_frame(self, code: str, message: str, page: Any = None) -> None:
        """``{"type": "error", "code": ..., "message": ...}`` (plus ``page`` for a subscription),
        only when the server's ``error_frames`` setting is on: else the wire stays Baserow's."""
        if not self.ctx.error_frames or self.state is not State.OPEN:
            return
        frame: Dict[str, Any] = {"type": "error", "code": code, "message": message}
        if page is not None:
            frame["page"] = safe_value(page) if isinstance(page, str) else None
        self.ctx.hub.send(self, text_frame(ujson.dumps(frame).encode()))

    def _remove_page(self, page_type: PageType, params: dict) -> None:
        if self.state is not State.OPEN:
            return
        hub = self.ctx.hub
        if page_type.missing(params) is None:
            hub.unsubscribe(self, page_type.group(params))
        hub.send(self, page_frame("page_discard", page_type.name, params))

    # --- heartbeat ------------------------------------------------------------------------------
    def ping(self) -> None:
        """Queue the shared ping frame (in order with the messages) and wait for a pong."""
        self.awaiting_pong = True
        self.ctx.hub.send(self, PING_FRAME)

    def ping_timed_out(self) -> None:
        if self.closed_by is None:
            self.closed_by = "ping_timeout"
        self.drop()

    # --- closing --------------------------------------------------------------------------------
    def close(self, code: int, reason: str) -> None:
        """Close with a close frame, after what is already queued; leave the hub at once."""
        if self.state >= State.CLOSING:
            return
        self.state = State.CLOSING
        if self.closed_by is None:
            self.closed_by = code
        if code == closecodes.SLOW_CONSUMER:
            # Its buffer is full: a close frame would wait behind it. Drop the connection now.
            self._leave()
            self._abort()
            return
        if self.transport is not None:
            self.transport.close(code, reason)
        self._leave()

    def drop(self) -> None:
        """Drop the TCP connection without a close frame (a peer that does not answer pings)."""
        if self.state >= State.CLOSING:
            return
        self.state = State.CLOSING
        self._leave()
        self._abort()

    def _abort(self) -> None:
        self.out.clear()
        if self.transport is not None:
            self.transport.abort()

    def closing(self, code: Optional[int], by_client: bool) -> None:
        """The transport started the closing handshake (the client's close echoed, a frame too
        big, or our own :meth:`close`): nothing more is queued, the subscriptions go now."""
        if self.state >= State.CLOSING:
            return  # our own close(): it leaves once the close frame is written
        self.state = State.CLOSING
        if self.closed_by is None and not by_client:
            self.closed_by = code
        self._leave()

    def connection_lost(self) -> None:
        """The TCP connection is gone."""
        self.state = State.CLOSED
        self._leave()
        self.out.clear()

    def _leave(self) -> None:
        """Leave the hub (subscriptions released, counted once by the server). Idempotent."""
        if self.web_socket_id is not None and self.web_socket_id in self.ctx.hub.connections:
            self.ctx.hub.remove(self)
            self.ctx.left(self)
