"""One WebSocket connection: the Tornado handler behind ``/ws/core/``.

It authenticates, answers with the ``authentication`` message, feeds client frames to the
:class:`~tornado_rt.protocol.ClientProtocol`, enforces the per-connection limits and tells the
server when it goes. It never decides who receives a published message.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import sys
import time
import uuid
from typing import Any, Optional

import ujson
from tornado.httputil import HTTPHeaders
from tornado.ioloop import PeriodicCallback
from tornado.iostream import IOStream
from tornado.websocket import WebSocketHandler, WebSocketProtocol13

from . import closecodes
from .auth import log_authenticator_error, to_principal
from .hub import text_frame
from .principal import ANONYMOUS
from .redaction import redact_uri as redact

log = logging.getLogger("tornado_rt.connection")

_NO_HEADERS = HTTPHeaders()
_AUTH_FAILED = text_frame(b'{"type":"authentication","success":false,"web_socket_id":null}')


class _Protocol(WebSocketProtocol13):
    """Tornado's RFC 6455 protocol with one hook: the moment the server starts closing (a limit,
    a force disconnect, shutdown, an oversized frame, or the echo of the client's own close), the
    connection leaves the hub. So nothing is written after the close frame (RFC 6455 §5.5.1) and
    its subscriptions are released at once, not when the peer answers.
    """

    def close(self, code: Optional[int] = None, reason: Optional[str] = None) -> None:
        handler = self.handler
        if handler._closed_by is None and not self.client_terminated:
            handler._closed_by = code
        handler._release()
        super().close(code, reason)

    async def _receive_frame_loop(self) -> None:
        """Read frames in a task of its own and return at once. Tornado awaits this loop at the
        bottom of the handshake's coroutine chain (``RequestHandler._execute`` -> ``get`` ->
        ``accept_connection``), which then stays suspended for the connection's whole life;
        letting that chain finish frees its frames and the request objects they hold (about
        2 KiB per idle connection)."""
        self._reader = asyncio.ensure_future(self._read_frames())

    async def _read_frames(self) -> None:
        try:
            await super()._receive_frame_loop()
        except asyncio.CancelledError:
            self._abort()
        except Exception:  # what RequestHandler._execute did for the awaited loop: log, drop
            if not self.stream or not self.stream.io_loop.asyncio_loop.is_closed():
                self.handler.log_exception(*sys.exc_info())
            try:
                self._abort()
            except Exception:
                pass


class _SmallQueue(list):
    """A list with ``popleft``: the queue operations IOStream uses (append, [0], [-1], popleft,
    clear, iteration), at 56 bytes empty instead of a deque's 760."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


_PING = b"\x89\x00"  # an empty ping frame: the same bytes for every connection


class Heartbeat:
    """One timer for all connections instead of Tornado's timer per connection.

    Every ``interval`` seconds each authenticated connection is queued the same empty ping frame
    (through the hub, in order with its messages); ``timeout`` seconds later every connection that
    has not answered with a pong since is dropped at once (counted as ``ping_timeout``) and its
    subscriptions released: a peer that does not answer pings would not answer a close frame either.
    """

    def __init__(self, hub: Any, interval: float, timeout: float):
        self.hub = hub
        self.interval = interval
        self.timeout = timeout
        self._timer: Optional[PeriodicCallback] = None
        self._check: Optional[Any] = None

    def start(self) -> None:
        if self._timer is None and self.interval:
            self._timer = PeriodicCallback(self.ping, self.interval * 1000)
            self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if self._check is not None:
            self._check.cancel()
            self._check = None

    def ping(self) -> None:
        if self._check is not None:  # timeout <= interval: the last round's deadline has come
            self._check.cancel()
            self.drop_silent()
        hub = self.hub
        for conn in list(hub.connections.values()):
            conn.awaiting_pong = True
            hub.send(conn, _PING)
        if self.timeout and self._check is None:
            self._check = asyncio.get_running_loop().call_later(self.timeout, self.drop_silent)

    def drop_silent(self) -> None:
        self._check = None
        for conn in [c for c in self.hub.connections.values() if c.awaiting_pong]:
            conn.ping_timed_out()


class RealtimeHandler(WebSocketHandler):
    """The WebSocket endpoint. Route it with ``RealtimeServer.routes()``; subclassing is allowed.

    Attributes the hub relies on: ``web_socket_id`` (None until authenticated), ``user_id``,
    ``principal``, ``pages``, ``out``, ``stream``.
    """

    def initialize(self, server: Any) -> None:
        self.server = server
        self.web_socket_id: Optional[str] = None
        self.principal = None
        self.user_id = None
        self.pages: dict = {}
        self.out: list = []
        self.stream = None
        self.sock = None
        self.backlog = False
        self._token: Optional[str] = None
        self._closed_by: Any = None  # close code, or "ping_timeout"; None: the client went
        self.disconnected = False  # True once the TCP connection is gone (on_close ran)
        self.awaiting_pong = False  # a heartbeat ping is unanswered
        self._tokens = float(server.settings.max_incoming_burst)
        self._refilled = 0.0

    # --- handshake ------------------------------------------------------------------------------
    def get(self, *args: Any, **kwargs: Any) -> Optional[Any]:
        # Not a coroutine itself: it returns Tornado's, so a connection holds one frame less.
        request = self.request
        raw = request.query_arguments.pop("jwt_token", None)
        request.arguments.pop("jwt_token", None)
        if raw:
            try:
                self._token = raw[0].decode("utf-8")
            except UnicodeDecodeError:
                self._token = None
        request.uri = redact(request.uri)
        request.query = redact(request.query)
        limit = self.server.settings.max_connections
        if self.server._closing or (limit and len(self.server.hub.connections) >= limit):
            self.set_status(503)
            self.set_header("Content-Type", "application/json")
            self.finish('{"error":"the server is shutting down","field":null}' if self.server._closing
                        else '{"error":"the server has reached its connection limit","field":null}')
            return None
        return super().get(*args, **kwargs)

    def check_origin(self, origin: str) -> bool:
        allowed = self.server.settings.allowed_origins
        if allowed is None:
            return super().check_origin(origin)
        return "*" in allowed or origin.lower().rstrip("/") in self.server.allowed_origins

    @property
    def max_message_size(self) -> int:  # type: ignore[override]
        return self.server.settings.max_message_size

    @property
    def ping_interval(self) -> Optional[float]:  # type: ignore[override]
        return None  # pings come from the server's shared Heartbeat, not a timer per connection

    def on_pong(self, data: bytes) -> None:
        self.awaiting_pong = False

    def ping_timed_out(self) -> None:
        """Drop a peer that did not answer the heartbeat ping (no close handshake)."""
        if self._closed_by is None:
            self._closed_by = "ping_timeout"
        self._release()
        if self.ws_connection is not None:
            self.ws_connection._abort()

    def get_websocket_protocol(self) -> Optional[WebSocketProtocol13]:
        protocol = super().get_websocket_protocol()  # Tornado's version check and parameters
        if protocol is None:
            return None
        server = self.server
        if server._ws_params is None:  # the same for every connection: share one object
            server._ws_params = protocol.params
        return _Protocol(self, False, server._ws_params)

    def get_compression_options(self) -> None:
        return None  # frames are shared between recipients; compression would make them per-peer

    def _request_summary(self) -> str:
        return "%s %s (%s)" % (self.request.method, redact(self.request.uri or ""), self.request.remote_ip)

    # --- lifetime -------------------------------------------------------------------------------
    def open(self, *args: Any, **kwargs: Any) -> Optional[Any]:
        self.stream = stream = self.ws_connection.stream
        # Direct sends (see Hub) only on plain TCP: TLS bytes must go through the SSL stream.
        self.sock = stream.socket if stream.__class__ is IOStream else None
        token, self._token = self._token, None
        server = self.server
        if token == "anonymous":
            return self._opened(ANONYMOUS if server.settings.allow_anonymous else None)
        if not token or server.authenticator is None:
            return self._opened(None)
        try:
            result = server.authenticator(token)
        except Exception:
            log_authenticator_error(token)
            return self._opened(None)
        if inspect.isawaitable(result):
            return self._open_async(result, token)
        return self._opened(to_principal(result))

    async def _open_async(self, pending: Any, token: str) -> None:
        """Await the async authenticator's result (it is called once per connection)."""
        try:
            result = await pending
        except Exception:
            log_authenticator_error(token)
            result = None
        self._opened(to_principal(result))

    def _opened(self, principal: Any) -> None:
        server = self.server
        hub = server.hub
        if self.stream is None or self.stream.closed():
            return
        if principal is not None and principal.user_id is None and not server.settings.allow_anonymous:
            principal = None  # an embedder's authenticator answered "anonymous": same switch
        if principal is None:
            server.counters.auth_failures += 1
            hub.send(self, _AUTH_FAILED)
            hub.close(self, closecodes.AUTHENTICATION_FAILED, "authentication failed")
            return
        if server._closing:  # an async authenticator answered after shutdown() began
            hub.close(self, closecodes.GOING_AWAY, "server shutting down")
            return
        limit = server.settings.max_connections_per_user
        if limit and principal.user_id is not None and len(hub.users.get(principal.user_id, ())) >= limit:
            hub.close(self, closecodes.TRY_AGAIN_LATER, "too many connections for this user")
            return
        self.principal = principal
        self.user_id = principal.user_id
        self.web_socket_id = str(uuid.uuid4())
        self._refilled = time.monotonic()
        self._shed_handshake_state()
        self.set_nodelay(True)  # real-time: no Nagle delay on small frames
        server._connected(self)
        hub.send(self, text_frame(ujson.dumps(
            {"type": "authentication", "success": True, "web_socket_id": self.web_socket_id}).encode()))

    def _shed_handshake_state(self) -> None:
        """Drop what only the HTTP handshake needed (headers, arguments, UI namespaces): a
        connection lives for hours and this is most of an idle connection's memory."""
        request = self.request
        request.headers = _NO_HEADERS
        request.arguments = request.query_arguments = request.body_arguments = {}
        request.files = {}
        request.body = b""
        request.connection = request.server_connection = None  # the stream is detached
        self._headers = _NO_HEADERS
        self.ui = None  # type: ignore[assignment]
        self.path_args = self.open_args = ()
        self.path_kwargs = self.open_kwargs = {}
        # IOStream's two write queues are deques, and an empty deque costs 760 bytes (a 64-slot
        # block). They stay empty on an idle connection (and the hub's direct sends rarely fill
        # them), so small lists with deque's popleft take their place. Only when the internals
        # are what this expects; otherwise nothing changes.
        stream = self.stream
        if type(getattr(stream, "_write_futures", None)) is collections.deque and not stream._write_futures:
            stream._write_futures = _SmallQueue()
        buffer = getattr(stream, "_write_buffer", None)
        if type(getattr(buffer, "_buffers", None)) is collections.deque and not buffer._buffers:
            buffer._buffers = _SmallQueue()

    def on_message(self, message: Any) -> Optional[Any]:
        if self.web_socket_id is None or self.stream is None:
            return None
        settings = self.server.settings
        if settings.max_incoming_rate:
            now = time.monotonic()
            tokens = min(settings.max_incoming_burst, self._tokens + (now - self._refilled) * settings.max_incoming_rate)
            self._refilled = now
            if tokens < 1:
                self.violate("too many messages")
                return None
            self._tokens = tokens - 1
        return self.server.protocol.handle(self, message)

    def violate(self, reason: str) -> None:
        """Close this connection for breaking a limit (4008), after what is already queued."""
        self.server.hub.close(self, closecodes.POLICY_VIOLATION, reason)

    def close(self, code: Optional[int] = None, reason: Optional[str] = None) -> None:
        if self._closed_by is None:
            self._closed_by = 1000 if code is None else code
        stream = self.stream
        self._release()
        if code == closecodes.SLOW_CONSUMER and stream is not None:
            # Its buffer is full: a close frame would wait behind it. Drop the connection now.
            stream.close()
            return
        super().close(code, reason)

    def _release(self) -> None:
        """Leave the hub (subscriptions released, counted in ``counters.closed``) and take the
        stream away from it: nothing more is queued or written for this connection. Idempotent."""
        self.stream = self.sock = None
        self.server._disconnected(self, self._closed_by)

    def on_close(self) -> None:
        self._release()
        self.disconnected = True
        self.out.clear()
