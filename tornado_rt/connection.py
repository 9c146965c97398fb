"""One WebSocket connection: the Tornado handler behind ``/ws/core/``, a thin adapter.

The handler refuses upgrades it must refuse (connection limit, shutdown, origin), takes the token
out of the request, and then only connects Tornado to the connection's
:class:`~tornado_rt.session.Session` (the protocol logic, no I/O) and its
:class:`~tornado_rt.transport.Transport` (the one writer, and every use of Tornado's internals).
It never decides anything itself.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from tornado.ioloop import PeriodicCallback
from tornado.websocket import WebSocketHandler, WebSocketProtocol13

from . import transport
from .proxy import apply_forwarded, log_origin_refused
from .redaction import redact_uri as redact
from .session import BINARY, PING, PONG, TEXT, Session


class Heartbeat:
    """One timer for all connections instead of Tornado's timer per connection.

    Every ``interval`` seconds each authenticated session is queued the same empty ping frame
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
        for session in list(self.hub.connections.values()):
            session.ping()
        if self.timeout and self._check is None:
            self._check = asyncio.get_running_loop().call_later(self.timeout, self.drop_silent)

    def drop_silent(self) -> None:
        self._check = None
        for session in [s for s in self.hub.connections.values() if s.awaiting_pong]:
            session.ping_timed_out()


class RealtimeHandler(transport.RedactedSummary, WebSocketHandler):
    """The WebSocket endpoint. Route it with ``RealtimeServer.routes()``, or give a subclass as
    ``RealtimeServer(handler_class=...)``. ``session`` is the connection's
    :class:`~tornado_rt.session.Session` once the WebSocket is open."""

    #: ``open()`` queues the 101 answer of the lean upgrade (transport.RealtimeProtocol) ahead of
    #: the connection's first frame. A subclass whose ``open()`` does not call this one's may set
    #: it False (the answer is then written right after its ``open()`` anyway).
    queues_handshake = True

    def initialize(self, server: Any) -> None:
        self.server = server
        self.session: Session = None  # type: ignore[assignment]  # set by open()
        self._token: Optional[str] = None
        self._positions = False

    def clear(self) -> None:
        # Tornado's, with the Date header formatted once per second (transport.clear_handler)
        if not transport.clear_handler(self):
            super().clear()

    def get(self, *args: Any, **kwargs: Any) -> Optional[Any]:  # type: ignore[override]
        # Not a coroutine itself: it returns Tornado's, so a connection holds one frame less.
        request = self.request
        apply_forwarded(request, self.server.settings.trusted_proxies)
        raw = request.query_arguments.pop("jwt_token", None)
        request.arguments.pop("jwt_token", None)
        if raw:
            try:
                self._token = raw[0].decode("utf-8")
            except UnicodeDecodeError:
                self._token = None
        positions = request.query_arguments.get("positions")  # the recovery extension (opt-in)
        self._positions = positions is not None and positions[-1:] in ([b"1"], [b"true"])
        request.uri = uri = redact(request.uri or "")
        request.query = uri.partition("?")[2]  # the query of the redacted URI: redacted once
        server = self.server
        limit = server.settings.max_connections
        if server._closing or (limit and len(server.hub.connections) >= limit):
            self.set_status(503)
            self.set_header("Content-Type", "application/json")
            self.finish('{"error":"the server is shutting down","field":null}' if server._closing
                        else '{"error":"the server has reached its connection limit","field":null}')
            return None
        return super().get(*args, **kwargs)

    def check_origin(self, origin: str) -> bool:
        allowed = self.server.settings.allowed_origins
        if allowed is None:
            ok = super().check_origin(origin)
        else:
            ok = "*" in allowed or origin.lower().rstrip("/") in self.server.allowed_origins
        if not ok:
            log_origin_refused(self.request, origin, allowed)
        return ok

    @property
    def max_message_size(self) -> int:
        return self.server.settings.max_message_size

    @property
    def ping_interval(self) -> Optional[float]:
        return None  # pings come from the server's shared Heartbeat, not a timer per connection

    def get_compression_options(self) -> None:
        return None  # frames are shared between recipients; compression would make them per-peer

    def get_websocket_protocol(self) -> Optional[WebSocketProtocol13]:
        server = self.server
        if server._ws_params is not None and type(self).get_compression_options is _no_compression:
            # Tornado's version check (RFC 6455: 13 only) without building its protocol object
            # and parameters again: ours share the first connection's (transport.make_protocol).
            if self.request.headers.get("Sec-WebSocket-Version") != "13":
                return None
            return transport.make_protocol(self, True, server)
        protocol: Any = super().get_websocket_protocol()  # Tornado's version check and parameters
        return transport.make_protocol(self, protocol, server)

    # --- Tornado -> session -------------------------------------------------------------------
    def open(self, *args: Any, **kwargs: Any) -> Optional[Any]:
        protocol: Any = self.ws_connection
        self.session = session = Session(self.server.sessions)
        session.positions = self._positions
        session.transport = protocol.transport = transport.Transport(
            protocol, session.out, self.server.settings.max_outgoing_buffer)
        take = getattr(protocol, "take_handshake", None)
        answer = take() if take is not None else None
        if answer is not None:  # the lean upgrade's 101: first on the wire, sent with the first frame
            self.server.hub.send(session, answer)
        transport.shed_handshake_state(self, protocol.stream)
        transport.set_nodelay(protocol.stream)  # real-time: no Nagle delay on small frames
        token, self._token = self._token, None
        return session.authenticate(token)

    def on_message(self, message: Any) -> Optional[Any]:
        return self.session.receive_frame(BINARY if isinstance(message, bytes) else TEXT, message)

    def on_ping(self, data: bytes) -> None:
        self.session.receive_frame(PING, data)

    def on_pong(self, data: bytes) -> None:
        self.session.receive_frame(PONG, data)

    def on_frame(self, opcode: int, data: bytes) -> None:
        """A frame Tornado has no public callback for: a fragment of a message that is not its
        last (``opcode`` 0) or a close frame (8). Only the frame reader in transport.py calls it
        (with the public-API fallback these frames are not seen one by one)."""
        self.session.receive_frame(opcode, data)

    def closing(self, code: Optional[int], by_client: bool) -> None:
        """The protocol started the closing handshake (see RealtimeProtocol.close)."""
        if self.session is not None:
            self.session.closing(code, by_client)

    def on_close(self) -> None:
        if self.session is not None:
            self.session.connection_lost()

    def close(self, code: Optional[int] = None, reason: Optional[str] = None) -> None:
        """Close this connection (after what is already queued for it)."""
        if self.session is None:
            super().close(code, reason)
        else:
            self.session.close(1000 if code is None else code, reason or "")


_no_compression = RealtimeHandler.get_compression_options
