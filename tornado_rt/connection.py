"""One WebSocket connection: the Tornado handler behind ``/ws/core/``.

It authenticates, answers with the ``authentication`` message, feeds client frames to the
:class:`~tornado_rt.protocol.ClientProtocol`, enforces the per-connection limits and tells the
server when it goes. It never decides who receives a published message.
"""
from __future__ import annotations

import inspect
import logging
import re
import time
import uuid
from typing import Any, Optional

import ujson
from tornado.websocket import WebSocketHandler

from . import closecodes
from .auth import authenticate, to_principal
from .hub import text_frame
from .principal import ANONYMOUS

log = logging.getLogger("tornado_rt.connection")

_TOKEN_IN_QUERY = re.compile(r"(jwt_token=)[^&]*", re.IGNORECASE)
_AUTH_FAILED = text_frame(b'{"type":"authentication","success":false,"web_socket_id":null}')


def redact(text: str) -> str:
    """Hide the value of ``jwt_token`` in a URI or query string."""
    return _TOKEN_IN_QUERY.sub(r"\1[redacted]", text)


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
        self._token: Optional[str] = None
        self._closed_by: Optional[int] = None
        self._tokens = float(server.settings.max_incoming_burst)
        self._refilled = 0.0

    # --- handshake ------------------------------------------------------------------------------
    async def get(self, *args: Any, **kwargs: Any) -> None:
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
        if limit and len(self.server.hub.connections) >= limit:
            self.set_status(503)
            self.set_header("Content-Type", "application/json")
            self.finish('{"error":"the server has reached its connection limit","field":null}')
            return
        await super().get(*args, **kwargs)

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
        return self.server.settings.ping_interval or None

    @property
    def ping_timeout(self) -> Optional[float]:  # type: ignore[override]
        return self.server.settings.ping_timeout or None

    def get_compression_options(self) -> None:
        return None  # frames are shared between recipients; compression would make them per-peer

    def _request_summary(self) -> str:
        return "%s %s (%s)" % (self.request.method, redact(self.request.uri or ""), self.request.remote_ip)

    # --- lifetime -------------------------------------------------------------------------------
    def open(self, *args: Any, **kwargs: Any) -> Optional[Any]:
        self.stream = self.ws_connection.stream
        token, self._token = self._token, None
        server = self.server
        if token == "anonymous":
            return self._opened(ANONYMOUS if server.settings.allow_anonymous else None)
        if not token or server.authenticator is None:
            return self._opened(None)
        try:
            result = server.authenticator(token)
        except Exception:
            log.exception("authenticator raised; connection refused")
            return self._opened(None)
        if inspect.isawaitable(result):
            return self._open_async(token)
        return self._opened(to_principal(result))

    async def _open_async(self, token: str) -> None:
        self._opened(await authenticate(self.server.authenticator, token))

    def _opened(self, principal: Any) -> None:
        server = self.server
        hub = server.hub
        if self.stream is None or self.stream.closed():
            return
        if principal is None:
            server.counters.auth_failures += 1
            hub.send(self, _AUTH_FAILED)
            hub.close(self, closecodes.AUTHENTICATION_FAILED, "authentication failed")
            return
        limit = server.settings.max_connections_per_user
        if limit and principal.user_id is not None and len(hub.users.get(principal.user_id, ())) >= limit:
            hub.close(self, closecodes.TRY_AGAIN_LATER, "too many connections for this user")
            return
        self.principal = principal
        self.user_id = principal.user_id
        self.web_socket_id = str(uuid.uuid4())
        self._refilled = time.monotonic()
        server._connected(self)
        hub.send(self, text_frame(ujson.dumps(
            {"type": "authentication", "success": True, "web_socket_id": self.web_socket_id}).encode()))

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
        if code == closecodes.SLOW_CONSUMER and stream is not None:
            # Its buffer is full: a close frame would wait behind it. Drop the connection now.
            self.out.clear()
            stream.close()
            return
        super().close(code, reason)

    def on_close(self) -> None:
        self.server._disconnected(self, self._closed_by)
        self.stream = None
        self.out.clear()
