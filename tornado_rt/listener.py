"""The TCP and HTTP front: an ``HTTPServer`` that keeps working when peers are hostile or the
process runs out of file descriptors.

:class:`GuardedHTTPServer` is Tornado's ``HTTPServer`` with:

* **An accept loop that survives fd exhaustion.** Tornado's accept handler raises on ``EMFILE`` /
  ``ENFILE`` on every loop turn (a busy loop and a traceback per attempt) while the pending
  clients time out. Here, when ``accept()`` fails for lack of descriptors (or buffers), one spare
  descriptor kept for the purpose is closed, the pending connections are accepted and closed at
  once (each counted as refused with reason ``fd_limit``), the spare is taken back, and
  accepting pauses for a short delay that doubles up to one second while the condition lasts;
  connections arriving meanwhile are refused the same way when it ends, so a client reads EOF
  within about a second instead of hanging until its own timeout. One WARNING names the limit (then at most one a
  minute, with the count); established connections are not touched; accepting resumes by itself
  when descriptors are free again.
* **Timeouts** (:class:`~tornado_rt.Settings`): ``header_timeout`` for the head of a connection's
  first request (counted from the accept, TLS handshake included: a slowloris is cut off),
  ``idle_timeout`` for a keep-alive connection waiting for its next request (which also bounds
  that request's head), and ``body_timeout`` for a request body. WebSocket connections leave
  these behind once upgraded; the heartbeat watches them.
* **No body where none is taken**: a ``GET``/``HEAD``/``DELETE``/``OPTIONS`` request (the
  WebSocket upgrade, ``/healthz``, ``/metrics`` included) that announces a body
  (``Content-Length`` other than 0, or ``Transfer-Encoding``) is answered 413 (400 for a
  malformed ``Content-Length``) with a JSON error naming the header, as soon as its head is
  read; the body is never read and the connection is closed.
* **A per-address cap on unauthenticated connections** (``max_unauthenticated_per_address``,
  0 = off): a TCP connection counts against its peer address from the accept until it is
  upgraded to a WebSocket (whose token is checked at once), makes a request that
  :func:`mark_authenticated` vouches for (the HTTP server API does, after the key check), or
  closes. A connection beyond the cap is closed at once, counted (``address_limit``).

* **A lane for the common requests** (``lane=True``, the default): the listener reads the first
  request head of a plain-TCP connection itself and answers the common WebSocket upgrade on the
  application's WebSocket path, and ``POST /api/publish`` of the common form on keep-alive
  connections, through the same handlers and delegates, without Tornado's per-request HTTP/1
  coroutine and routing (a quarter less CPU per connect). Every other head (another path or
  method, anything unusual: chunked bodies, ``Expect``, HTTP/1.0, ``Connection: close``, a
  repeated header, every refusal before an upgrade) is put back in front of the read buffer and
  Tornado's HTTP/1 connection serves the rest of that connection as it would have: the answers
  are the same either way (``tests/test_lane*.py`` compare them). No lane with TLS, ``xheaders``
  or trusted proxies, or when Tornado's internals differ (``transport.lane_problems``).
  ``stats.lane_upgrades`` / ``lane_publishes`` / ``lane_fallbacks`` count what it did.

Refusals and timeouts are counted in :class:`ListenerStats` (Prometheus collector:
:meth:`GuardedHTTPServer.collector`) and logged rate-limited (one line a minute per kind).

:func:`listen` binds and starts one; :func:`raise_fd_limit` raises the soft ``RLIMIT_NOFILE`` to
the hard limit (``tornado-rt serve`` does at start).
"""
from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import re
import socket
import time
import weakref
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple
from urllib.parse import urlsplit

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.log import app_log
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets

from . import transport
from .proxy import is_trusted_peer
from .settings import Settings

log = logging.getLogger("tornado_rt.listener")

#: Methods whose requests must not carry a body.
BODYLESS_METHODS = ("GET", "HEAD", "DELETE", "OPTIONS")

#: ``accept()`` errors meaning "no descriptor (or buffer) for a new connection right now".
EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: Connections accepted (or refused) per readiness event, as Tornado's own accept handler.
ACCEPT_BATCH = 128

#: The pause of the accept loop after a failed ``accept()``: first, and largest (seconds).
MIN_PAUSE = 0.05
MAX_PAUSE = 1.0

#: Seconds between two log lines of the same kind of refusal.
LOG_INTERVAL = 60.0

#: The unauthenticated connections a GuardedHTTPServer counts: stream -> (server, peer address).
#: Kept here, not on the stream, and weakly, so a stream Tornado drops is not held.
_GUARDED: "weakref.WeakKeyDictionary[IOStream, Tuple[GuardedHTTPServer, str]]" = weakref.WeakKeyDictionary()


# --- process-wide helpers ----------------------------------------------------------------------------

def fd_limits() -> Optional[Tuple[int, int]]:
    """``(soft, hard)`` of ``RLIMIT_NOFILE``, or None where there is no such limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return None
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_fd_limit() -> Optional[Tuple[int, int, int]]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns ``(before, after, hard)`` or
    None where there is no such limit. Raises ``OSError`` / ``ValueError`` if the system refuses.
    An unlimited hard limit is not a valid soft limit for descriptors: then the largest of
    2**20, 65536 and 10240 the system accepts is used."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        if soft == resource.RLIM_INFINITY or soft >= hard:
            return soft, soft, hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return soft, hard, hard
    error: Optional[Exception] = None
    for target in (1 << 20, 65536, 10240):
        if soft != resource.RLIM_INFINITY and soft >= target:
            return soft, soft, hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target, hard
        except (OSError, ValueError) as exc:
            error = exc
    assert error is not None
    raise error


def _describe_limit() -> str:
    limits = fd_limits()
    if limits is None:  # pragma: no cover - not on Unix
        return "the system's file descriptor limit"
    soft, hard = limits
    return f"RLIMIT_NOFILE soft limit {soft}, hard limit {hard}"


class _Spare:
    """One descriptor held in reserve, so that a process out of descriptors can still accept a
    pending connection in order to close it (instead of leaving the client hanging)."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None

    def acquire(self) -> bool:
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return False
        return True

    def refuse_pending(self, sock: socket.socket, limit: int) -> int:
        """Accept and close up to ``limit`` pending connections of ``sock``; how many."""
        if self.fd is None:
            return 0
        os.close(self.fd)
        self.fd = None
        refused = 0
        try:
            for _ in range(limit):
                try:
                    connection, _address = sock.accept()
                except ConnectionAbortedError:
                    continue
                except OSError:  # nothing pending (BlockingIOError), or still no descriptor
                    break
                connection.close()
                refused += 1
        finally:
            self.acquire()
        return refused


_SPARE = _Spare()


class _RateLimitedLog:
    """At most one line per ``interval`` seconds per key; the next line says how many were
    held back."""

    def __init__(self, interval: float = LOG_INTERVAL):
        self.interval = interval
        self._last: Dict[str, float] = {}
        self._held: Dict[str, int] = {}

    def __call__(self, key: str, level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            message += " (%d more since the last such line)"
            args = (*args, held)
        log.log(level, message, *args)


# --- statistics ----------------------------------------------------------------------------------------

class ListenerStats:
    """Plain counters of one :class:`GuardedHTTPServer`, read by :meth:`GuardedHTTPServer.collector`.

    ``refused``: connections closed at accept, by reason (``fd_limit``, ``address_limit``);
    ``header_timeouts``: connections closed for not sending a request head in time;
    ``bodies_refused``: requests refused for announcing a body on a bodyless method;
    ``accept_errors``: other ``accept()`` failures.
    """

    __slots__ = ("refused", "header_timeouts", "bodies_refused", "accept_errors", "lane_upgrades",
                 "lane_fallbacks", "lane_publishes")

    def __init__(self) -> None:
        self.refused: Dict[str, int] = {"fd_limit": 0, "address_limit": 0}
        self.header_timeouts = 0
        self.bodies_refused = 0
        self.accept_errors = 0
        #: WebSocket upgrades answered on the connect lane (see GuardedHTTPServer), and first
        #: request heads the lane read and handed to Tornado (not counted in the metrics).
        self.lane_upgrades = 0
        self.lane_fallbacks = 0
        #: ``POST /api/publish`` requests the lane read and drove (first or later on a connection).
        self.lane_publishes = 0


class ListenerCollector:
    """Prometheus collector of a :class:`GuardedHTTPServer` (register it in your registry)."""

    def __init__(self, server: "GuardedHTTPServer"):
        self.server = server

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.server.stats
        refused = CounterMetricFamily(
            "tornado_rt_connections_refused",
            "TCP connections closed at accept, by reason (fd_limit: out of file descriptors; "
            "address_limit: max_unauthenticated_per_address)", labels=["reason"])
        for reason, n in sorted(stats.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        yield CounterMetricFamily("tornado_rt_http_header_timeouts",
                                  "Connections closed for not completing a request head within header_timeout",
                                  value=stats.header_timeouts)
        yield CounterMetricFamily("tornado_rt_http_bodies_refused",
                                  "Requests refused at the head for announcing a body on a method that takes none",
                                  value=stats.bodies_refused)
        yield CounterMetricFamily("tornado_rt_accept_errors",
                                  "accept() failures other than a lack of file descriptors",
                                  value=stats.accept_errors)
        yield GaugeMetricFamily("tornado_rt_unauthenticated_connections",
                                "TCP connections not yet upgraded or authenticated",
                                value=self.server.unauthenticated_count())


# --- the accept loop -------------------------------------------------------------------------------------

class _Acceptor:
    """The accept handler of one listening socket, with a pause (back-off) after a failure."""

    def __init__(self, server: "GuardedHTTPServer", sock: socket.socket):
        self.server = server
        self.sock = sock
        self.io_loop = IOLoop.current()
        self.delay = MIN_PAUSE
        self.paused: Optional[object] = None
        self.removed = False
        self.io_loop.add_handler(sock, self._on_readable, IOLoop.READ)

    def remove(self) -> None:
        self.removed = True
        if self.paused is not None:
            self.io_loop.remove_timeout(self.paused)
            self.paused = None
        else:
            self.io_loop.remove_handler(self.sock)

    def _on_readable(self, fd: Any, events: int) -> None:
        server = self.server
        for _ in range(ACCEPT_BATCH):
            if self.removed or self.paused is not None:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                server._accept_failed(self, exc)
                return
            self.delay = MIN_PAUSE
            server._accepted(connection, address)

    def pause(self) -> None:
        if self.paused is not None or self.removed:
            return
        self.io_loop.remove_handler(self.sock)
        self.paused = self.io_loop.call_later(self.delay, self._resume)
        self.delay = min(self.delay * 2, MAX_PAUSE)

    def _resume(self) -> None:
        self.paused = None
        if not self.removed:
            self.io_loop.add_handler(self.sock, self._on_readable, IOLoop.READ)


# --- the server --------------------------------------------------------------------------------------------

class GuardedHTTPServer(HTTPServer):
    """Tornado's ``HTTPServer`` with the defences described in :mod:`tornado_rt.listener`.

    ``settings``: a :class:`~tornado_rt.Settings` to take ``header_timeout``, ``idle_timeout``,
    ``body_timeout`` and ``max_unauthenticated_per_address`` from (explicit keyword arguments
    win; without either, the :class:`~tornado_rt.Settings` defaults). ``bodyless_methods``:
    methods whose requests may not announce a body. Other keyword arguments go to
    ``HTTPServer`` (``max_header_size``, ``ssl_options``, ``xheaders``, ...), except
    ``idle_connection_timeout`` and ``body_timeout``, which these settings replace.
    """

    def initialize(self, request_callback: Any, *, settings: Optional[Settings] = None,  # type: ignore[override]
                   header_timeout: Optional[float] = None, idle_timeout: Optional[float] = None,
                   body_timeout: Optional[float] = None,
                   max_unauthenticated_per_address: Optional[int] = None,
                   bodyless_methods: Iterable[str] = BODYLESS_METHODS, lane: bool = True,
                   **kwargs: Any) -> None:
        if "idle_connection_timeout" in kwargs:
            raise TypeError("GuardedHTTPServer: use idle_timeout (and header_timeout), not idle_connection_timeout")
        base = settings if settings is not None else Settings()
        chosen = base.replace(**{name: value for name, value in (
            ("header_timeout", header_timeout), ("idle_timeout", idle_timeout),
            ("body_timeout", body_timeout),
            ("max_unauthenticated_per_address", max_unauthenticated_per_address)) if value is not None})
        self.header_timeout = chosen.header_timeout
        self.idle_timeout = chosen.idle_timeout
        self.max_unauthenticated_per_address = chosen.max_unauthenticated_per_address
        self.trusted_proxies = tuple(chosen.trusted_proxies)  # every client behind one: not capped
        self.bodyless_methods = frozenset(m.upper() for m in bodyless_methods)
        self.stats = ListenerStats()
        self._log = _RateLimitedLog()
        self._exhausted = False
        self._unauthenticated: Dict[str, Set[IOStream]] = {}
        self._header_deadlines: Dict[IOStream, Any] = {}
        self._listening: List[socket.socket] = []  # for ``ports``, whichever accept loop is used
        self._lane: Any = None if lane else False  # the lane's target (_Lane), False: no lane
        self._lane_reading: Set[IOStream] = set()  # connections whose head the lane is reading
        self._lane_serving: Set[IOStream] = set()  # connections with a laned publish under way
        super().initialize(request_callback, idle_connection_timeout=chosen.idle_timeout,
                           body_timeout=chosen.body_timeout, **kwargs)
        # Every request head is bounded by this server's own deadline (one call_later per head:
        # the first within min(header_timeout, idle_timeout) of the accept, each later one within
        # idle_timeout of its start), not by a with_timeout of Tornado's around each head's read.
        self._own_idle = transport.take_head_timeouts(self)

    # --- accepting ----------------------------------------------------------------------------------
    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        """Start accepting on ``sockets`` with the guarded accept loop."""
        sockets = list(sockets)
        self._listening.extend(sockets)
        if not transport.can_adopt_listeners(self):  # Tornado's internals differ: its own loop
            super().add_sockets(sockets)
            return
        _SPARE.acquire()
        for sock in sockets:
            transport.adopt_listener(self, sock, _Acceptor(self, sock).remove)

    def _accepted(self, connection: socket.socket, address: Any) -> None:
        if self._exhausted:
            self._exhausted = False
            self._log("fd_recovered", logging.INFO, "file descriptors are available again: accepting "
                      "connections (%d refused so far for lack of them)", self.stats.refused["fd_limit"])
        try:
            transport.handle_accepted(self, connection, address)
        except OSError as exc:  # a peer that vanished during the TLS set-up
            log.debug("connection from %s dropped at accept: %s", address, exc)
            connection.close()

    def _accept_failed(self, acceptor: _Acceptor, exc: OSError) -> None:
        if exc.errno in EXHAUSTION_ERRNOS:
            self._exhausted = True
            if not _SPARE.acquire():  # the spare was lost: only pause
                refused = 0
            else:
                refused = _SPARE.refuse_pending(acceptor.sock, ACCEPT_BATCH)
            self.stats.refused["fd_limit"] += refused
            self._log("fd_limit", logging.WARNING,
                      "out of file descriptors (%s: %s): new connections are closed at once until "
                      "some close; established ones are served (tornado_rt_connections_refused_total"
                      "{reason=\"fd_limit\"} = %d)", errno.errorcode.get(exc.errno or 0, exc.errno),
                      _describe_limit(), self.stats.refused["fd_limit"])
        else:
            self.stats.accept_errors += 1
            self._log(f"accept_{exc.errno}", logging.WARNING, "accept() failed: %s; pausing briefly", exc)
        acceptor.pause()

    # --- connections --------------------------------------------------------------------------------
    def handle_stream(self, stream: IOStream, address: Any) -> None:
        host = address[0] if isinstance(address, tuple) and address else None
        cap = self.max_unauthenticated_per_address
        if cap and host is not None and not is_trusted_peer(host, self.trusted_proxies):
            held = self._unauthenticated.get(host)
            if held is not None and len(held) >= cap:
                self.stats.refused["address_limit"] += 1
                self._log("address_limit", logging.WARNING,
                          "refused a connection from %s: it already has %d unauthenticated connections "
                          "(max_unauthenticated_per_address)", host, len(held))
                stream.close()
                return
        if host is not None:
            self._unauthenticated.setdefault(host, set()).add(stream)
            _GUARDED[stream] = (self, host)
        if self._own_idle and self.idle_timeout < self.header_timeout:  # Tornado's bound, first
            self._header_deadlines[stream] = self._deadline(stream, self.idle_timeout, self._idle_timed_out)
        else:
            self._header_deadlines[stream] = self._deadline(stream, self.header_timeout, self._header_timed_out)
        lane = self._lane
        if lane is None:
            lane = self._lane = self._find_lane(stream)
        if lane and stream.__class__ is IOStream:
            # Read one loop turn later, as Tornado's request loop (a task) does: by then the head
            # has usually arrived, and is read without waiting (no read registration, no EAGAIN).
            self._lane_reading.add(stream)
            stream.io_loop.asyncio_loop.call_soon(self._lane_read, stream, address, lane)  # type: ignore[attr-defined]
            return
        super().handle_stream(stream, address)

    # --- the connect lane ---------------------------------------------------------------------
    def _find_lane(self, stream: IOStream) -> Any:
        """The lane's target (:class:`_Lane`) for this server's application, or False (no lane)."""
        if not self._own_idle or self.xheaders or self.trusted_proxies or self.ssl_options is not None:
            return False
        problems = transport.lane_problems(stream)
        if problems:
            import tornado
            log.warning("Tornado %s differs from what tornado-rt expects (%s); every request is read by "
                        "Tornado's HTTP/1 connection: more CPU per connect", tornado.version, "; ".join(problems))
            return False
        return _Lane.find(self.request_callback) or False

    def _lane_read(self, stream: IOStream, address: Any, lane: "_Lane", context: Any = None) -> None:
        """Read the first request head of ``stream`` (as Tornado's HTTP/1 connection reads it,
        within the same head deadline), then :meth:`_lane_head`."""
        try:
            future: Any = stream.read_until_regex(b"\r?\n\r?\n", max_bytes=self.conn_params.max_header_size)
        except StreamClosedError:
            self._lane_ended(stream)
            return
        if future.done():  # the head was already there
            self._lane_head(stream, address, lane, future, context)
            return
        future.add_done_callback(lambda f: self._lane_head(stream, address, lane, f, context))

    def _lane_head(self, stream: IOStream, address: Any, lane: "_Lane", future: Any, context: Any = None) -> None:
        self._lane_reading.discard(stream)
        try:
            data = future.result()
        except Exception:  # closed (peer, head deadline) or a head over the limit: closed as by Tornado
            self._lane_ended(stream)
            return
        if data[:5] == b"POST " and lane.publish_path is not None:
            try:
                post = self._lane_post_request(stream, address, lane, data, context)
            except Exception:  # a head Tornado's parser or request refuses: Tornado's to answer
                post = None
            if post is not None:
                self._lane_post(stream, address, lane, *post)
                return
        try:
            request = self._lane_request(stream, address, lane, data)
        except Exception:  # a head Tornado's parser or request refuses: Tornado's to answer
            request = None
        if request is None:
            self.stats.lane_fallbacks += 1
            transport.unread(stream, data)
            super().handle_stream(stream, address)
            return
        self.stats.lane_upgrades += 1
        # What _RequestGuard.headers_received does first: the head is in (the body check has
        # nothing to refuse: no body header was sent). Then what Tornado's _HandlerDelegate does.
        self._head_received(stream)
        request.connection.begin(self._lane_detached)  # type: ignore[union-attr]
        app = lane.app
        try:
            handler = lane.handler_class(app, request, **lane.kwargs)
            # Its first step now: the upgrade is answered (and open() run) without a task or a
            # loop turn when open() finishes at once; a task only for what it waits for.
            running = transport.execute(handler, [t(request) for t in app.transforms],
                                        stream.io_loop.asyncio_loop)  # type: ignore[attr-defined]
        except Exception:  # as Tornado's request loop: logged, the connection closed
            app_log.error("Uncaught exception in %s", transport.request_summary(request), exc_info=True)
            self._lane_ended(stream)
            return
        if running is None:  # done: what _lane_done does
            self._lane_detached(stream)
            return
        running.add_done_callback(lambda f: self._lane_done(stream, f))

    def _lane_request(self, stream: IOStream, address: Any, lane: "_Lane",
                      data: bytes) -> Optional[httputil.HTTPServerRequest]:
        """The request whose head is ``data`` if it is an upgrade Tornado would answer with 101
        (every check of ``WebSocketHandler.get``, ``RealtimeHandler.get`` and Tornado's
        ``accept_connection`` that could refuse it is made here first, without side effects);
        None leaves the request to Tornado."""
        if data[:4] != b"GET ":
            return None
        text = data.decode("latin1")  # Tornado's HTTP1Connection._parse_headers
        eol = text.find("\n")
        start_line = httputil.parse_request_start_line(text[:eol].rstrip("\r"))
        if start_line.version != "HTTP/1.1" or start_line.path.partition("?")[0] not in lane.paths:
            return None
        parsed = fast_headers(text[eol + 1:])
        if parsed is None:  # an unusual head (see fast_headers): Tornado's
            return None
        headers, fields = parsed
        get = fields.get
        if ("Content-Length" in fields or "Transfer-Encoding" in fields or "Expect" in fields
                or get("Upgrade", "").lower() != "websocket"
                or "upgrade" not in [s.strip().lower() for s in get("Connection", "").split(",")]
                or get("Sec-Websocket-Version") != "13" or not get("Sec-Websocket-Key")
                or not get("Host") or get("Sec-Websocket-Protocol")):
            return None
        server = lane.server
        limit = server.settings.max_connections
        if server._closing or (limit and len(server.hub.connections) >= limit) \
                or not lane.origin_allowed(get("Sec-Fetch-Site"), get("Origin"), get("Host") or ""):
            return None
        conn = transport.LaneConnection(stream, self.conn_params,
                                        transport.lane_context(stream, address, self.protocol,
                                                               self.trusted_downstream),
                                        start_line, headers)
        return transport.lane_request(conn, start_line, headers)

    # --- the publish lane ------------------------------------------------------------------------
    def _lane_post_request(self, stream: IOStream, address: Any, lane: "_Lane", data: bytes,
                           context: Any = None) -> Optional[
            Tuple[Any, httputil.RequestStartLine, httputil.HTTPHeaders, int]]:
        """``(request, start_line, headers, length)`` if ``data`` is the head of the common
        ``POST`` of the HTTP API's publish route (HTTP/1.1, the exact path, strict headers, one
        Content-Length of ASCII digits within the publish fast path's limit, no
        Transfer-Encoding, no Expect, no Connection header but keep-alive); None leaves the
        request (and the rest of the connection) to Tornado."""
        text = data.decode("latin1")  # Tornado's HTTP1Connection._parse_headers
        eol = text.find("\n")
        start_line = httputil.parse_request_start_line(text[:eol].rstrip("\r"))
        if start_line.version != "HTTP/1.1" or start_line.path.partition("?")[0] != lane.publish_path:
            return None
        parsed = fast_headers(text[eol + 1:])
        if parsed is None:
            return None
        headers, fields = parsed
        length = fields.get("Content-Length")
        connection = fields.get("Connection")
        ceiling = self.conn_params.max_body_size
        if (length is None or not (length.isascii() and length.isdigit())
                or int(length) > lane.publish_limit or (ceiling is not None and int(length) > ceiling)
                or "Transfer-Encoding" in fields or "Expect" in fields or not fields.get("Host")
                or (connection is not None and connection.lower() != "keep-alive")
                or self.conn_params.no_keep_alive):
            return None
        if context is None:  # the connection's (one per connection, as Tornado's)
            context = transport.lane_context(stream, address, self.protocol, self.trusted_downstream)
        conn = transport.LaneConnection(stream, self.conn_params, context, start_line, headers, keep_alive=True)
        request = httputil.HTTPServerRequest(connection=conn, start_line=start_line, headers=headers)
        return request, start_line, headers, int(length)

    def _lane_post(self, stream: IOStream, address: Any, lane: "_Lane", request: Any,
                   start_line: httputil.RequestStartLine, headers: httputil.HTTPHeaders, length: int) -> None:
        """Drive the application's delegate of the publish route (what Tornado's routing gives:
        ``_FastPublish``, or ``PublishHandler``'s) as Tornado's ``HTTP1Connection._read_message``
        does: head, body (read whole, within body_timeout), finish; once the answer is written,
        the next head is read on the lane again. In the common case (the body already
        buffered, the delegate answering without waiting for a coroutine) without a coroutine."""
        self.stats.lane_publishes += 1
        self._head_received(stream)
        self._lane_serving.add(stream)
        conn = request.connection
        delegate: Any = None
        try:
            delegate = lane.app.get_handler_delegate(request, lane.publish_class, lane.publish_kwargs, [], {})
            waiting = delegate.headers_received(start_line, headers)
        except Exception:
            self._lane_post_failed(stream, conn, delegate)
            return
        if waiting is None and conn.stream is not None and (length == 0 or stream._read_buffer_size >= length):
            received = None
            if length:
                reading: Any = stream.read_bytes(length)
                body = reading.result()  # buffered: read at once
                if not conn._write_finished:
                    try:
                        received = delegate.data_received(body)
                    except Exception:
                        self._lane_post_failed(stream, conn, delegate)
                        return
            if received is None:
                self._lane_post_finish(stream, address, lane, conn, delegate)
            else:  # the delegate waits for something: the rest as a coroutine
                self._lane_post_slow(stream, address, lane, conn, delegate, received, 0)
            return
        self._lane_post_slow(stream, address, lane, conn, delegate, waiting, length)

    def _lane_post_slow(self, stream: IOStream, address: Any, lane: "_Lane", conn: Any, delegate: Any,
                        waiting: Any, length: int) -> None:
        """The rest of :meth:`_lane_post` as a coroutine: ``waiting`` (what the delegate
        returned) awaited, then the body (``length`` bytes, none if already delivered) read
        within body_timeout and delivered, then finish."""
        async def rest() -> None:
            from tornado import gen
            from tornado.log import gen_log

            try:
                if waiting is not None:
                    await waiting
                if conn.stream is None:  # detached
                    self._lane_serving.discard(stream)
                    self._lane_detached(stream)
                    return
                if length:
                    reading = stream.read_bytes(length)
                    timeout = conn._body_timeout  # body_timeout, or what the delegate set (set_body_timeout)
                    try:
                        if timeout is None:
                            body = await reading
                        else:
                            body = await gen.with_timeout(stream.io_loop.time() + timeout, reading,
                                                          quiet_exceptions=StreamClosedError)
                    except TimeoutError:
                        gen_log.info("Timeout reading body from %s", conn.context)
                        self._lane_post_closed(stream, delegate)
                        return
                    if not conn._write_finished:
                        received = delegate.data_received(body)
                        if received is not None:
                            await received
            except StreamClosedError:
                self._lane_post_closed(stream, delegate)
                return
            except Exception:
                self._lane_post_failed(stream, conn, delegate)
                return
            self._lane_post_finish(stream, address, lane, conn, delegate)

        stream.io_loop.add_future(asyncio.ensure_future(rest()), lambda f: f.result())

    def _lane_post_finish(self, stream: IOStream, address: Any, lane: "_Lane", conn: Any, delegate: Any) -> None:
        conn._read_finished = True
        if not conn._write_finished:
            try:
                delegate.finish()
            except Exception:
                self._lane_post_failed(stream, conn, delegate)
                return
        # Waiting for the answer: the stream's close reaches the request (Tornado does the same).
        if not conn._finish_future.done() and conn.stream is not None and not stream.closed():
            stream.set_close_callback(conn._on_connection_close)
        conn._finish_future.add_done_callback(lambda f: self._lane_post_done(stream, address, lane, conn))

    def _lane_post_done(self, stream: IOStream, address: Any, lane: "_Lane", conn: Any) -> None:
        """The answer is written (or the connection closed): read the next head on the lane,
        within idle_timeout (the deadline start_request sets for a keep-alive connection)."""
        self._lane_serving.discard(stream)
        if conn.stream is None:  # detached
            self._lane_detached(stream)
            return
        stream.set_close_callback(None)
        if stream.closed():
            self._lane_ended(stream)
            return
        self._header_deadlines[stream] = self._deadline(stream, self.idle_timeout, self._idle_timed_out)
        self._lane_reading.add(stream)
        self._lane_read(stream, address, lane, conn.context)

    def _lane_post_failed(self, stream: IOStream, conn: Any, delegate: Any) -> None:
        """An exception from the delegate: logged as Tornado's _ExceptionLoggingContext logs it;
        the delegate is told the connection closed, and it is."""
        app_log.error("Uncaught exception", exc_info=True)
        self._lane_post_closed(stream, delegate)

    def _lane_post_closed(self, stream: IOStream, delegate: Any) -> None:
        self._lane_serving.discard(stream)
        if delegate is not None:
            try:
                delegate.on_connection_close()
            except Exception:
                app_log.error("Uncaught exception", exc_info=True)
        self._lane_ended(stream)

    def _lane_detached(self, stream: IOStream) -> None:
        """The WebSocket took the stream: what on_close does when Tornado's connection ends."""
        self._head_received(stream)
        self.release(stream)

    def _lane_done(self, stream: IOStream, future: Any) -> None:
        self._lane_detached(stream)  # already, if upgraded; else the connection closes
        if not future.cancelled():
            future.result()  # as Tornado's _HandlerDelegate: an escaped exception is raised (logged)

    def _lane_ended(self, stream: IOStream) -> None:
        """The connection ended before a head (what Tornado's on_close would do)."""
        self._lane_reading.discard(stream)
        self._lane_detached(stream)
        if not stream.closed():
            stream.close()

    async def close_all_connections(self) -> None:
        for stream in list(self._lane_reading) + list(self._lane_serving):  # as Tornado's connections
            stream.close()
        await super().close_all_connections()

    def _header_timed_out(self, stream: IOStream) -> None:
        if self._header_deadlines.pop(stream, None) is None or stream.closed():
            return
        self.stats.header_timeouts += 1
        self._log("header_timeout", logging.INFO, "closed a connection that sent no complete request head "
                  "within header_timeout (%gs)", self.header_timeout)
        stream.close()

    def _idle_timed_out(self, stream: IOStream) -> None:
        # What Tornado's idle_connection_timeout did: close, neither counted nor logged.
        if self._header_deadlines.pop(stream, None) is not None and not stream.closed():
            stream.close()

    @staticmethod
    def _deadline(stream: IOStream, delay: float, callback: Any) -> asyncio.TimerHandle:
        """``callback(stream)`` in ``delay`` seconds: what ``stream.io_loop.call_later`` does,
        straight on the asyncio loop (no ``functools.partial`` and no Tornado wrapper per
        connection: these callbacks return nothing and raise nothing); cancelled with
        ``.cancel()`` (what ``IOLoop.remove_timeout`` calls)."""
        return stream.io_loop.asyncio_loop.call_later(delay, callback, stream)  # type: ignore[attr-defined]

    def _head_received(self, stream: IOStream) -> None:
        deadline = self._header_deadlines.pop(stream, None)
        if deadline is not None:
            deadline.cancel()

    def release(self, stream: IOStream) -> None:
        """``stream`` no longer counts as unauthenticated (idempotent)."""
        guard = _GUARDED.get(stream)
        if guard is None or guard[0] is not self:
            return
        del _GUARDED[stream]
        host = guard[1]
        held = self._unauthenticated.get(host)
        if held is not None:
            held.discard(stream)
            if not held:
                del self._unauthenticated[host]

    @property
    def ports(self) -> List[int]:
        """The local ports of the listening sockets (``listen(app, 0)`` picks a free one)."""
        return [sock.getsockname()[1] for sock in self._listening if sock.family != socket.AF_UNIX]

    def stop(self) -> None:
        self._listening.clear()  # Tornado closes them
        super().stop()

    def unauthenticated_count(self) -> int:
        return sum(len(s) for s in self._unauthenticated.values())

    def on_close(self, server_conn: Any) -> None:
        # The HTTP connection ended: closed, or detached for a WebSocket (upgraded).
        stream = getattr(server_conn, "stream", None)
        if stream is not None:
            self._head_received(stream)
            self.release(stream)
        super().on_close(server_conn)

    def start_request(self, server_conn: Any, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        # Called as the connection starts to wait for a request's head. The first one's deadline
        # runs since the accept; a later one (keep-alive) gets idle_timeout.
        stream = getattr(server_conn, "stream", None)
        if self._own_idle and stream is not None and stream not in self._header_deadlines:
            self._header_deadlines[stream] = self._deadline(stream, self.idle_timeout, self._idle_timed_out)
        return _RequestGuard(self, server_conn, request_conn, super().start_request(server_conn, request_conn))

    def _refuse_body(self, request_conn: Any, start_line: httputil.RequestStartLine,
                     headers: httputil.HTTPHeaders) -> bool:
        """Answer a request that announces a body on a bodyless method; False if it announces none."""
        method = start_line.method.upper()
        if method not in self.bodyless_methods:
            return False
        length = headers.get("Content-Length")
        encoding = headers.get("Transfer-Encoding")
        path = start_line.path.split("?", 1)[0]
        if encoding is not None:
            status, field, text = 413, "Transfer-Encoding", f"{method} {path} takes no request body; this " \
                                                            f"request announces one (Transfer-Encoding)"
        elif length is not None and length.strip() != "0":
            if length.strip().isascii() and length.strip().isdigit():  # "²".isdigit(), int("²") fails
                status, field, text = 413, "Content-Length", f"{method} {path} takes no request body; this " \
                                                            f"request announces {int(length)} bytes"
            else:
                status, field, text = 400, "Content-Length", "Content-Length is not a number"
        else:
            return False
        self.stats.bodies_refused += 1
        address = getattr(getattr(request_conn, "context", None), "remote_ip", "?")
        self._log("body_refused", logging.WARNING, "refused %s %s from %s: a request body on a method "
                  "that takes none (%s)", method, path, address, field)
        body = json.dumps({"error": text, "field": field}).encode()
        if hasattr(request_conn, "set_max_body_size"):
            request_conn.set_max_body_size(1 << 62)  # no second, bare 400 from Tornado's own check
        reason = "Content Too Large" if status == 413 else "Bad Request"
        request_conn.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", status, reason),
            httputil.HTTPHeaders({"Content-Type": "application/json; charset=UTF-8", "Content-Length": str(len(body)),
                                  "Connection": "close", "Cache-Control": "no-store"}),
            body)
        request_conn.finish()  # the body is not read: the connection closes once this is sent
        return True


_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 9110 token, Tornado's _ABNF.field_name
_HEAD_BLOCK = re.compile(rf"(?:{_TCHARS}:[\t\x20-\x7e]*\r\n)*\r\n")
_HEAD_LINE = re.compile(rf"({_TCHARS}):[\t ]*([\t\x20-\x7e]*?)[\t ]*\r\n")


@functools.lru_cache(1000)
def _normalize(name: str) -> str:
    """Http-Header-Case, as Tornado's HTTPHeaders keys its fields."""
    return "-".join([word.capitalize() for word in name.split("-")])


def fast_headers(block: str) -> Optional[Tuple[httputil.HTTPHeaders, Dict[str, str]]]:
    """The header lines ``block`` (after the start line, through the empty line) parsed as
    ``HTTPHeaders.parse`` parses them, for the common case only: CRLF line ends, every line
    ``token ":" value`` with printable ASCII (space and tab included) in the value, no name
    twice. Anything else (bare LF, obs-text, control characters, folding, a repeated name,
    no header at all): None, and the caller uses ``HTTPHeaders.parse``. In the common case
    this is the same result (each value stripped of spaces and tabs, names in Http-Header-Case)
    with two regular-expression passes instead of Tornado's per-line checks. Returned with a
    plain dict of the same fields (keys in Http-Header-Case) for quick look-ups."""
    if not _HEAD_BLOCK.fullmatch(block):
        return None
    fields: Dict[str, str] = {}
    for name, value in _HEAD_LINE.findall(block):
        name = _normalize(name)
        if name in fields:
            return None
        fields[name] = value
    return transport.make_headers(fields), fields


class _Lane:
    """What the connect lane answers: the requests of ``paths`` (exact paths, the query aside),
    which ``app``'s routing gives to ``handler_class`` (a
    :class:`~tornado_rt.connection.RealtimeHandler` with its own upgrade checks unchanged) with
    ``kwargs``; ``server`` is its :class:`~tornado_rt.RealtimeServer`. With the HTTP server
    API's application, also ``POST`` on ``publish_path`` (its publish route, whose delegate
    ``app.get_handler_delegate`` gives, as Tornado's routing would) with a body of at most
    ``publish_limit`` bytes (the publish fast path's limit)."""

    __slots__ = ("app", "paths", "handler_class", "kwargs", "server", "allowed", "publish_path",
                 "publish_class", "publish_kwargs", "publish_limit")

    def __init__(self, app: Any, paths: FrozenSet[str], handler_class: Any, kwargs: Dict[str, Any]):
        self.app = app
        self.paths = paths
        self.handler_class = handler_class
        self.kwargs = kwargs
        self.server = kwargs["server"]
        self.allowed = self.server.settings.allowed_origins
        self.publish_path: Optional[str] = None
        self.publish_class: Any = None
        self.publish_kwargs: Dict[str, Any] = {}
        self.publish_limit = 0
        self._find_publish()

    def _find_publish(self) -> None:
        """The publish route of the HTTP server API's application (:class:`ApiApplication`), if
        its path is a plain one that no earlier rule matches."""
        from tornado.routing import PathMatches

        from .httpapi import ApiApplication, PublishHandler

        app = self.app
        if not isinstance(app, ApiApplication) or type(app).get_handler_delegate is not ApiApplication.get_handler_delegate:
            return
        rules = app.wildcard_router.rules
        for index, rule in enumerate(rules):
            if rule.target is not PublishHandler:
                continue
            if not isinstance(rule.matcher, PathMatches):
                return
            pattern = rule.matcher.regex.pattern
            path = pattern[:-1] if pattern.endswith("$") else pattern
            if not path.startswith("/") or any(c in path for c in ".^$*+?{}[]\\|()"):
                return
            probe = httputil.HTTPServerRequest(start_line=httputil.RequestStartLine("POST", path, "HTTP/1.1"),
                                               headers=httputil.HTTPHeaders({"Host": "localhost"}))
            match = rule.matcher.match(probe)
            if match is None or match.get("path_args") or match.get("path_kwargs") \
                    or any(not isinstance(r.matcher, PathMatches) or r.matcher.match(probe) is not None
                           for r in rules[:index]):
                return
            kwargs = dict(rule.target_kwargs or {})
            api = kwargs.get("api")
            if api is None:
                return
            self.publish_path = path
            self.publish_class = PublishHandler
            self.publish_kwargs = rule.target_kwargs
            self.publish_limit = min(api.max_body_size, app.max_fast_body)
            return

    @classmethod
    def find(cls, app: Any) -> Optional["_Lane"]:
        """The lane of ``app`` (a Tornado ``Application`` routing by path only, with one
        RealtimeHandler route whose paths no earlier rule matches), or None."""
        from tornado.routing import AnyMatches, PathMatches, Rule
        from tornado.web import Application

        from .connection import RealtimeHandler

        if not isinstance(app, Application) or type(app).start_request is not Application.start_request \
                or type(app).find_handler is not Application.find_handler \
                or not app.settings.get("compiled_template_cache", True) \
                or not app.settings.get("static_hash_cache", True):
            return None
        delegate = type(app).get_handler_delegate
        if delegate is not Application.get_handler_delegate and delegate.__module__ != "tornado_rt.httpapi":
            return None  # (the HTTP server API's only diverts POST /api/publish)
        rules = app.default_router.rules
        if len(rules) != 1 or not isinstance(rules[0].matcher, AnyMatches) or rules[0].target is not app.wildcard_router:
            return None  # host-specific rules
        for index, rule in enumerate(app.wildcard_router.rules):
            target = rule.target
            if not (isinstance(target, type) and issubclass(target, RealtimeHandler)):
                continue
            if not _lane_handler(target) or not isinstance(rule.matcher, PathMatches):
                return None
            pattern = rule.matcher.regex.pattern
            base = pattern[:-1] if pattern.endswith("$") else pattern
            base = base[:-2] if base.endswith("/?") else base
            if not base.startswith("/") or any(c in base for c in ".^$*+?{}[]\\|()"):
                return None
            paths = frozenset((base, base + "/"))
            earlier: List[Rule] = app.wildcard_router.rules[:index]
            for path in paths:
                probe = httputil.HTTPServerRequest(start_line=httputil.RequestStartLine("GET", path, "HTTP/1.1"),
                                                   headers=httputil.HTTPHeaders({"Host": "localhost"}))
                match = rule.matcher.match(probe)
                if match is None or match.get("path_args") or match.get("path_kwargs") \
                        or any(not isinstance(r.matcher, PathMatches) or r.matcher.match(probe) is not None
                               for r in earlier):
                    return None
            kwargs = dict(rule.target_kwargs or {})
            if "server" not in kwargs:
                return None
            return cls(app, paths, target, kwargs)
        return None

    def origin_allowed(self, fetch_site: Optional[str], origin: Optional[str], host: str) -> bool:
        """Whether ``WebSocketHandler.get`` lets the upgrade through without a log line
        (Tornado 6.6's ``_check_cross_origin`` with ``RealtimeHandler.check_origin``); False
        when it would refuse or consult Tornado's own ``check_origin`` (the lane then leaves
        the request to Tornado)."""
        if fetch_site in ("same-origin", "none"):
            return True
        if fetch_site is None:
            if origin is None or urlsplit(origin).netloc.lower() == host.lower():
                return True
        elif not origin:
            return False
        allowed = self.allowed
        if allowed is None:
            return False
        assert origin is not None
        return "*" in allowed or origin.lower().rstrip("/") in self.server.allowed_origins


def _lane_handler(cls: Any) -> bool:
    """Whether ``cls`` decides the upgrade as RealtimeHandler does (the lane's checks are its)."""
    from tornado.web import RequestHandler

    from .connection import RealtimeHandler

    return (getattr(cls, "queues_handshake", False) is True
            and all(getattr(cls, name) is getattr(RealtimeHandler, name) for name in (
                "get", "check_origin", "get_websocket_protocol", "get_compression_options", "initialize",
                "_execute", "select_subprotocol"))
            and cls.prepare is RequestHandler.prepare)


class _RequestGuard(httputil.HTTPMessageDelegate):
    """Wraps the application's delegate of one request: ends the header deadline, refuses a body
    on a bodyless method before the application sees the request."""

    __slots__ = ("server", "server_conn", "request_conn", "delegate", "refused")

    def __init__(self, server: GuardedHTTPServer, server_conn: Any, request_conn: Any,
                 delegate: httputil.HTTPMessageDelegate):
        self.server = server
        self.server_conn = server_conn
        self.request_conn = request_conn
        self.delegate = delegate
        self.refused = False

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        stream = getattr(self.server_conn, "stream", None)
        if stream is not None:
            self.server._head_received(stream)
        if self.server._refuse_body(self.request_conn, start_line, headers):
            self.refused = True
            return None
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        if self.refused:
            return None
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        if not self.refused:
            self.delegate.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.delegate.on_connection_close()


def mark_authenticated(request: httputil.HTTPServerRequest) -> None:
    """Tell the :class:`GuardedHTTPServer` that ``request`` carried a valid credential, so its
    TCP connection no longer counts against ``max_unauthenticated_per_address``. Call it from
    a handler once the credential is checked; a no-op under any other server."""
    stream = getattr(request.connection, "stream", None)
    guard = _GUARDED.get(stream) if stream is not None else None
    if guard is not None and stream is not None:
        guard[0].release(stream)


def listen(app: Any, port: int, address: str = "", *, settings: Optional[Settings] = None,
           backlog: int = 128, reuse_port: bool = False, **kwargs: Any) -> GuardedHTTPServer:
    """Bind ``address:port`` and serve ``app`` on it with a :class:`GuardedHTTPServer` (the
    guarded counterpart of ``app.listen``). ``settings`` and ``kwargs`` as for the server. When
    ``app`` is the HTTP server API (:func:`tornado_rt.httpapi.make_app`) with metrics, the
    listener's counters join its ``/metrics``."""
    sockets: List[socket.socket] = bind_sockets(port, address or None, backlog=backlog, reuse_port=reuse_port)
    server = GuardedHTTPServer(app, settings=settings, **kwargs)
    server.add_sockets(sockets)
    attach_metrics(server, app)
    return server


def attach_metrics(server: GuardedHTTPServer, app: Any) -> None:
    """Add ``server``'s counters to the ``/metrics`` of ``app`` if it is the HTTP server API."""
    metrics = getattr(getattr(app, "http_api", None), "metrics", None)
    if metrics is not None:
        metrics.registry.register(ListenerCollector(server))
