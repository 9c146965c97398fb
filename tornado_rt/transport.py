"""The Tornado transport: the one writer of a connection, and every use of Tornado's internals.

Nothing else in tornado-rt touches a private Tornado attribute. What this module relies on:

* ``IOStream._total_write_index`` / ``_total_write_done_index`` (ints): whether, and how many,
  bytes of a connection Tornado still holds. A direct ``socket.send`` is allowed only when
  Tornado holds none, else the bytes would overtake (or split) Tornado's.
* ``IOStream._write_futures`` and ``IOStream._write_buffer._buffers`` (deques): replaced by
  small lists on idle connections (an empty deque costs 760 bytes).
* ``WebSocketProtocol13._write_frame(fin, opcode, data, flags)``: overridden so that Tornado's
  own frames (pongs, close frames, pings, ``write_message``) go through the :class:`Transport`
  too, in order with everything queued before them.
* ``WebSocketProtocol13._receive_frame()`` (a coroutine, with ``_read_bytes``, ``_send_pong``,
  ``_run_callback``, ``_abort``): replaced by our frame reader, so that every frame reaches the
  session (and its incoming rate) and RFC 6455 violations are answered with 1002 / 1007.
* ``IOStream._write_buffer`` (``peek``/``advance``/``append``) and ``_write_futures``: a backlog
  is cut at a frame boundary on shutdown (:meth:`Transport.discard_backlog`).
* ``WebSocketProtocol13._receive_frame_loop()`` (a coroutine): run as a task of its own, so that
  the handshake's coroutine chain finishes (about 2 KiB less per idle connection).
* ``RequestHandler._headers``: dropped with the rest of the handshake state.
* ``WebSocketProtocol13._accept_connection(handler)`` (a coroutine): replaced by the lean upgrade
  (:meth:`RealtimeProtocol._accept_connection`): the 101 answer is precomputed bytes queued
  ahead of the connection's first frame (one send for the answer and the ``authentication``
  message) instead of Tornado's header objects, ``finish()`` and a write of its own; the stream
  is taken with the public ``RequestHandler.detach()`` and the access line written with the public
  ``Application.log_request``. With a subprotocol offered or compression on it is Tornado's.
* ``TCPServer._sockets`` / ``_handlers`` (dicts) and ``TCPServer._handle_connection``: the
  listener's own accept loop (:mod:`tornado_rt.listener`: back-off at the file-descriptor limit)
  registers its listening sockets there and hands accepted connections on as Tornado would.
* ``HTTPServer.conn_params.header_timeout`` (an ``HTTP1ConnectionParameters``), which
  ``HTTP1Connection._read_message`` (``_read_message_inner``) wraps every request head's read in ``gen.with_timeout`` for
  unless it is None (``HTTPServer`` always sets it: ``idle_connection_timeout or 3600``): set to
  None by the guarded listener, whose own deadline per connection (one ``call_later``) bounds
  each head instead (:func:`take_head_timeouts`; a Future, a chained Future and a timeout less
  per request).
* For the listener's connect lane (:func:`lane_problems`): ``IOStream._read_buffer`` /
  ``_read_buffer_size`` (a head the lane read is put back, :func:`unread`), the request state of
  ``HTTP1Connection`` (``_request_start_line``, ``_request_headers``, ``_disconnect_on_finish``,
  ``_on_connection_close``), ``tornado.httpserver._HTTPRequestContext``,
  ``RequestHandler._execute`` (its first step taken outside a task, :func:`execute`) and
  Tornado 6.6's ``_check_cross_origin``. When they differ, one WARNING, and Tornado's HTTP/1
  connection reads every request.
* ``HTTPServerRequest.__init__``, ``tornado.httputil._ABNF.host`` and
  ``_DEFAULT_PARSE_BODY_CONFIG`` (:func:`lane_request`, checked by :func:`request_problems`: the
  constructor's exact text): the lane's request is built as that constructor builds it, without
  its ``copy.deepcopy``; when it differs, one WARNING, and the constructor builds it.
* ``HTTPHeaders._as_list`` / ``_combined_cache`` (:func:`make_headers`, checked by
  :func:`headers_problems`): the lane's parsed headers and the handler's default headers are
  built at once instead of one ``__setitem__`` per field (else, one WARNING, one at a time).
* ``RequestHandler.clear()`` (:func:`clear_handler`): repeated with the ``Date`` header formatted
  once per second, when its source is the expected one (else Tornado's own).
* ``RequestHandler._request_summary()``: overridden (:class:`RedactedSummary`, the base of the
  WebSocket and HTTP API handlers) so that Tornado's own log lines (access log, uncaught
  exceptions) show the URI with ``jwt_token`` and other credentials redacted.

They are checked once: the protocol class at import, the stream on the first connection. When
something differs (a Tornado upgrade), one WARNING is logged and the public API is used
instead: no direct sends (every byte through ``IOStream.write``, which keeps order by itself),
the outgoing-buffer limit through ``IOStream.max_write_buffer_size``, Tornado's own frame
writing and frame loop, the deques left as they are, Tornado's own accept loop. Slower and
bigger, never wrong. (The request summary has no public counterpart: when Tornado's log paths no
longer call it, the WARNING says that its log lines may show credentials.)
``tests/test_tornado_contract.py`` fails loudly when any of these changes.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import logging
import re
import _socket
import socket as _socket_module
import struct
import sys
import time
from array import array
from typing import Any, Dict, Generator, List, Optional, Tuple

import tornado
from tornado import httpserver as _httpserver, httputil as _httputil
from tornado.escape import parse_qs_bytes
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine, format_timestamp, responses
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError
from tornado.util import _websocket_mask
from tornado.log import access_log as _access_log, app_log
from tornado.web import Application, HTTPError, RequestHandler
from tornado.websocket import WebSocketProtocol13

from .redaction import redact_uri

log = logging.getLogger("tornado_rt.transport")

_NO_HEADERS = HTTPHeaders()
_CLOSE = 0x8
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


def frame(payload: bytes, first: int = 0x81) -> bytes:
    """An unmasked server-to-client frame (RFC 6455 §5.2) around ``payload``; ``first`` is its
    first byte (FIN, RSV bits, opcode), by default that of a whole text message. The one frame
    builder: ``hub.text_frame`` (the fan-out's, built once per message) is this function.

    Server-to-client frames are never masked, so the same bytes serve every recipient."""
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return _pack_short(first, 126, n) + payload
    return _pack_long(first, 127, n) + payload


_unpack_short = struct.Struct("!H").unpack
_unpack_long = struct.Struct("!Q").unpack
_unpack_code = _unpack_short
_DATA_OPCODES = (0x0, 0x1, 0x2)
_CONTROL_OPCODES = (0x8, 0x9, 0xA)


def valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (RFC 6455 §7.4.1 and the IANA registry:
    1000-1003, 1007-1014, 3000-4999; never 1004-1006, 1015, below 1000 or 5000 and up)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _frame_problem(first: int, second: int, length: int, in_message: bool) -> Optional[str]:
    """What makes a client frame break RFC 6455 §5 (answered with 1002), or None."""
    opcode = first & 0x0F
    if not second & 0x80:
        return "unmasked client frame"
    if first & 0x70:
        return "reserved bits set without an extension"
    if opcode in _CONTROL_OPCODES:
        if not first & 0x80 or length > 125:
            return "fragmented or oversized control frame"
        return None
    if opcode not in _DATA_OPCODES:
        return f"unknown opcode {opcode}"
    if opcode == 0 and not in_message:
        return "continuation frame without a message"
    if opcode and in_message:
        return "new message before the fragmented one ended"
    return None


# --- the checks --------------------------------------------------------------------------------

def protocol_problems(cls: Any = WebSocketProtocol13) -> List[str]:
    """What differs in Tornado's WebSocket protocol class from what this module relies on."""
    problems = []
    write_frame = getattr(cls, "_write_frame", None)
    if write_frame is None:
        problems.append("WebSocketProtocol13._write_frame is missing")
    else:
        try:
            names = list(inspect.signature(write_frame).parameters)
        except (TypeError, ValueError):
            names = []
        if names != ["self", "fin", "opcode", "data", "flags"]:
            problems.append(f"WebSocketProtocol13._write_frame takes {names}")
    loop = getattr(cls, "_receive_frame_loop", None)
    if loop is None or not inspect.iscoroutinefunction(loop):
        problems.append("WebSocketProtocol13._receive_frame_loop is not a coroutine function")
    else:  # the frame reader hooks into the loop: one problem, so the fallback stays all or nothing
        missing = [name for name in ("_receive_frame", "_read_bytes") if not inspect.iscoroutinefunction(
            getattr(cls, name, None))] + [name for name in ("_send_pong", "_run_callback", "_abort")
                                          if not callable(getattr(cls, name, None))]
        if missing:
            problems.append(f"WebSocketProtocol13's frame reader differs ({', '.join(missing)})")
    return problems


def upgrade_problems(cls: Any = WebSocketProtocol13, handler: Any = RequestHandler) -> List[str]:
    """What differs from what the lean upgrade (:meth:`RealtimeProtocol._accept_connection`)
    relies on: Tornado's ``_accept_connection(self, handler)`` coroutine (replaced), the public
    ``compute_accept_value``/``start_pinging`` and ``RequestHandler.detach``."""
    accept = getattr(cls, "_accept_connection", None)
    try:
        names = list(inspect.signature(accept).parameters) if accept is not None else []
    except (TypeError, ValueError):
        names = []
    problems = []
    if not inspect.iscoroutinefunction(accept) or names != ["self", "handler"]:
        problems.append(f"WebSocketProtocol13._accept_connection is not a coroutine of {names}")
    missing = [name for name in ("compute_accept_value", "start_pinging") if not callable(getattr(cls, name, None))]
    if not callable(getattr(handler, "detach", None)):
        missing.append("RequestHandler.detach")
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    return problems


def stream_problems(stream: Any) -> List[str]:
    """What differs in an IOStream instance from what this module relies on."""
    problems = []
    for name in ("_total_write_index", "_total_write_done_index"):
        if type(getattr(stream, name, None)) is not int:
            problems.append(f"IOStream.{name} is not an int")
    if type(getattr(stream, "_write_futures", None)) is not collections.deque:
        problems.append("IOStream._write_futures is not a deque")
    buffer = getattr(stream, "_write_buffer", None)
    if type(getattr(buffer, "_buffers", None)) is not collections.deque:
        problems.append("IOStream._write_buffer._buffers is not a deque")
    return problems


class Internals:
    """The outcome of the checks. ``protocol``: the frame overrides are used; ``stream``: direct
    sends, buffer sizes and small queues are used (None until the first stream is checked);
    ``upgrade``: the lean upgrade is used."""

    def __init__(self) -> None:
        problems = protocol_problems()
        self.protocol = not problems
        self.stream: Optional[bool] = None
        if problems:
            self.fall_back(problems)
        upgrade = upgrade_problems()
        #: the lean upgrade is used (else Tornado's own 101 answer, one WARNING)
        self.upgrade = not upgrade
        if upgrade:
            import tornado
            log.warning("Tornado %s differs from what tornado-rt expects (%s); using Tornado's own "
                        "WebSocket upgrade instead: more CPU per connect", tornado.version, "; ".join(upgrade))

    def check_stream(self, stream: Any) -> bool:
        if self.stream is None:
            problems = stream_problems(stream)
            self.stream = not problems
            if problems:
                self.fall_back(problems)
        return self.stream

    @staticmethod
    def fall_back(problems: List[str]) -> None:
        import tornado
        log.warning("Tornado %s differs from what tornado-rt expects (%s); using Tornado's public "
                    "API instead: slower fan-out, more memory per connection", tornado.version,
                    "; ".join(problems))


INTERNALS = Internals()


def handler_problems(cls: Any = RequestHandler, app: Any = Application) -> List[str]:
    """What differs in Tornado's request handler from what :class:`RedactedSummary` relies on:
    ``RequestHandler._request_summary()`` exists, and Tornado's log lines are built with it (the
    access log, ``Application.log_request``; uncaught exceptions, ``RequestHandler.log_exception``)."""
    summary = getattr(cls, "_request_summary", None)
    if not callable(summary):
        return ["RequestHandler._request_summary is missing"]
    problems = []
    for owner, name, call in ((app, "log_request", "handler._request_summary()"),
                              (cls, "log_exception", "self._request_summary()")):
        method = getattr(owner, name, None)
        if not callable(method):
            problems.append(f"{owner.__name__}.{name} is missing")
            continue
        try:
            source = inspect.getsource(method)
        except (OSError, TypeError):  # no source to read (a frozen or .pyc-only install): trust it
            continue
        if call not in source:
            problems.append(f"{owner.__name__}.{name} does not call _request_summary()")
    return problems


def check_handler() -> bool:
    """Whether Tornado's log lines go through :class:`RedactedSummary` (else one WARNING)."""
    problems = handler_problems()
    if problems:
        import tornado
        log.warning("Tornado %s differs from what tornado-rt expects (%s); Tornado's own log lines "
                    "(access log, uncaught exceptions) may show request URIs unredacted, jwt_token "
                    "included: check your log handlers", tornado.version, "; ".join(problems))
    return not problems


HANDLER_SUMMARY = check_handler()


def request_summary(request: Any) -> str:
    """``METHOD /redacted-uri (peer)``: how every log line names an HTTP request (handlers and the
    publish fast path alike), never with a credential of its URI."""
    return "%s %s (%s)" % (request.method, redact_uri(request.uri or ""), request.remote_ip)


class RedactedSummary(RequestHandler):
    """The base of tornado-rt's handlers: Tornado's own log lines about a request (access log,
    uncaught exceptions) show its URI with credentials (``jwt_token``, ...) redacted."""

    def request_summary(self) -> str:
        """``METHOD /redacted-uri (peer)``: how a log line names this request."""
        return request_summary(self.request)

    def _request_summary(self) -> str:  # Tornado's name, which its log lines call
        return self.request_summary()

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Tornado's uncaught-exception line also prints ``repr(request)``, whose URI still holds
        the token until the handler redacts it: name the request by its summary only."""
        if isinstance(value, HTTPError):
            super().log_exception(typ, value, tb)  # a warning naming the summary, no repr
            return
        app_log.error("Uncaught exception %s", self.request_summary(), exc_info=(typ, value, tb))


# --- the writer --------------------------------------------------------------------------------

class Transport:
    """The one writer of one connection: every byte sent on it goes through here.

    ``out`` is the connection's queue of frames not yet written (the session's; the hub's
    fan-out appends to it). :meth:`flush` writes the queue with one write; :meth:`send_frame`
    writes one of Tornado's own frames after the queue. A write goes straight to the socket
    (no Future, no buffer bookkeeping) only on plain TCP and only while Tornado holds no byte of
    this connection; what the kernel does not take, and every other write, goes through
    ``IOStream.write``, which keeps order. After the close frame nothing more is written.
    """

    __slots__ = ("protocol", "stream", "sock", "out", "closed", "_direct", "_writes")

    def __init__(self, protocol: Any, out: list, max_buffer: int = 0):
        self.protocol = protocol
        self.stream = stream = protocol.stream
        self.out = out
        self.closed = False
        internals = INTERNALS.check_stream(stream) and INTERNALS.protocol
        self._direct = internals
        # Direct sends only on plain TCP: TLS bytes must go through the SSL stream.
        self.sock = stream.socket if internals and stream.__class__ is IOStream else None
        # The writes Tornado may still hold: (start index, end index, frame lengths, bytes of the
        # first frame sent directly before), so a backlog can be cut at a frame boundary.
        self._writes: Optional[List[Tuple[int, int, "array[int]", int]]] = None
        if not internals and max_buffer:
            stream.max_write_buffer_size = max_buffer  # the public way to bound the buffer

    @property
    def handler(self) -> Any:
        return self.protocol.handler

    def gone(self) -> bool:
        """Whether nothing can be written any more (close frame sent, or the stream closed)."""
        return self.closed or self.stream.closed()

    def flush(self) -> int:
        """Write the queue; returns how many bytes Tornado still holds for this connection."""
        out = self.out
        if not out:
            return 0
        data = out[0] if len(out) == 1 else b"".join(out)
        if self.closed:
            out.clear()
            return 0
        try:
            if self._send(data) is None:
                return 0
        except StreamClosedError:
            self.closed = True
            return 0
        except StreamBufferFullError:
            return sys.maxsize  # the public API's limit (fallback): over the limit
        if self._direct:
            stream = self.stream
            return stream._total_write_index - stream._total_write_done_index
        return 0

    def _send(self, data: Any) -> "Optional[asyncio.Future[None]]":
        """Write ``data`` (the queue, joined) and empty the queue: straight to the socket while
        Tornado holds no byte of this connection, what the kernel does not take through
        ``IOStream.write``. None when the socket took everything, else IOStream's Future."""
        out = self.out
        sock = self.sock
        sent = 0
        if sock is not None:
            stream = self.stream
            if stream._total_write_index == stream._total_write_done_index:
                try:
                    sent = sock.send(data)
                except OSError:
                    sent = 0  # full (EAGAIN) or gone: IOStream.write finds out which
                if sent == len(data):
                    out.clear()
                    return None
                if sent:
                    data = memoryview(data)[sent:]
        lengths = array("Q", map(len, out)) if self._direct else None
        out.clear()
        return self._write(data, lengths, sent)

    def _write(self, data: Any, lengths: "Optional[array[int]]", sent: int) -> "asyncio.Future[None]":
        """``IOStream.write``, noting where the frames of the write end (with the internals)."""
        stream = self.stream
        start = stream._total_write_index if lengths is not None else 0
        idle = lengths is not None and start == stream._total_write_done_index
        future = stream.write(data)
        if lengths is not None:
            writes = self._writes
            if idle or writes is None:
                writes = self._writes = []
            elif len(writes) > 16:
                done = stream._total_write_done_index
                k = 0
                while k < len(writes) and writes[k][1] < done:
                    k += 1
                del writes[:k]
            writes.append((start, stream._total_write_index, lengths, sent))
        return future

    def buffered(self) -> int:
        """How many bytes of this connection Tornado holds now (0 once it is gone, and always
        with the public-API fallback, which bounds each buffer through IOStream only)."""
        stream = self.stream
        if not self._direct or stream.closed():
            return 0
        return stream._total_write_index - stream._total_write_done_index

    def send_frame(self, frame: bytes, opcode: int) -> "asyncio.Future[None]":
        """Write one of Tornado's own frames after everything queued; Tornado's contract:
        returns a Future, raises ``StreamClosedError`` when the stream is gone."""
        if self.closed:
            raise StreamClosedError()
        out = self.out
        out.append(frame)
        data = b"".join(out)
        if opcode == _CLOSE:
            self.closed = True  # RFC 6455 §5.5.1: nothing after the close frame
        future = self._send(data)
        if future is None:  # all on the socket: Tornado's contract still wants a Future
            future = asyncio.get_running_loop().create_future()
            future.set_result(None)
        return future

    def discard_backlog(self) -> Optional[int]:
        """Drop the frames Tornado holds that the peer has not started to receive, keeping the
        frame in progress (its remaining bytes) and the close frame when it is queued last: the
        peer then reads whole frames, then the close frame, never a frame spliced into another.
        Returns how many bytes were dropped, or None when that cannot be done safely (the
        public-API fallback: the connection is left to Tornado's close timeout, which aborts it)."""
        stream = self.stream
        if not self._direct or stream.closed():
            return None
        done = stream._total_write_done_index
        total = stream._total_write_index
        if total == done:
            return 0
        keep_end = None
        for start, end, lengths, sent in self._writes or ():
            if end <= done:
                continue
            if start == done and not sent:
                keep_end = done  # nothing of this write is out yet: a frame boundary
                break
            pos = start - sent
            for n in lengths:
                pos += n
                if pos >= done:
                    keep_end = pos  # the end of the frame in progress
                    break
            break
        if keep_end is None:
            return None
        last = self._writes[-1] if self._writes else None
        # the close frame, if written, is the last frame of the last write
        close_len = last[2][-1] if self.closed and last is not None and last[2] else 0
        tail_start = total - close_len
        if keep_end >= tail_start:
            return 0
        buffer = stream._write_buffer
        keep = _take(buffer, keep_end - done)
        _take(buffer, tail_start - keep_end, keep=False)
        tail = _take(buffer, total - tail_start)
        buffer.append(keep)
        buffer.append(tail)
        dropped = tail_start - keep_end
        stream._total_write_index = new_total = total - dropped
        futures = stream._write_futures
        moved = [(index if index <= keep_end else max(keep_end, index - dropped), future)
                 for index, future in futures]
        futures.clear()
        futures.extend(moved)
        self._writes = [(done, new_total, array("Q", (keep_end - done, total - tail_start)), 0)]
        return dropped

    def close(self, code: Optional[int], reason: Optional[str]) -> None:
        """Start the closing handshake: the queue, then the close frame (through Tornado)."""
        self.flush()  # the queue first (with the fallback protocol Tornado writes the close frame)
        handler = self.protocol.handler
        if handler.ws_connection is not None:
            handler.ws_connection.close(code, reason)
            handler.ws_connection = None

    def abort(self) -> None:
        """Drop the TCP connection now, without a close frame (its buffer is full, or the peer
        does not answer pings, so it would not read one)."""
        self.closed = True
        self.out.clear()
        self.stream.close()


def _take(buffer: Any, n: int, keep: bool = True) -> bytes:
    """The next ``n`` bytes of an IOStream write buffer, taken out of it (dropped: ``keep``
    false)."""
    parts = []
    while n > 0:
        view = buffer.peek(n)
        got = len(view)
        if keep:
            parts.append(bytes(view))
        view.release()
        buffer.advance(got)
        n -= got
    return b"".join(parts)


# --- Tornado's protocol, adapted ---------------------------------------------------------------

_UPGRADE = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: ")


class RealtimeProtocol(WebSocketProtocol13):
    """Tornado's RFC 6455 protocol with its frames written by the :class:`Transport`, its frame
    loop run as a task, the lean upgrade, and the session told the moment the server starts
    closing (a limit, a force disconnect, shutdown, an oversized frame, or the echo of the
    client's own close), so nothing is queued after the close frame and subscriptions are
    released at once."""

    transport: Optional[Transport] = None
    #: The 101 answer of the lean upgrade until the handler's ``open()`` queues it (take_handshake).
    handshake: Optional[bytes] = None

    def take_handshake(self) -> Optional[bytes]:
        """The 101 answer not yet written (the lean upgrade), once: the handler queues it ahead
        of anything else on the connection, so it goes out with the first frame in one send."""
        answer, self.handshake = self.handshake, None
        return answer

    async def _accept_connection(self, handler: Any) -> None:
        """The upgrade, once Tornado has checked the request (Upgrade and Connection headers,
        Origin, version, Host and key present): the same answer as Tornado's (101 with Upgrade,
        Connection and Sec-WebSocket-Accept), built from precomputed bytes and queued by the
        handler's ``open()`` ahead of its first frame instead of written on its own through
        Tornado's response headers and ``finish()``. A subprotocol offered, compression on, or
        a handler that does not queue it: Tornado's own."""
        request = handler.request
        headers = request.headers
        if not INTERNALS.upgrade or self._compression_options is not None \
                or headers.get("Sec-WebSocket-Protocol") or not getattr(handler, "queues_handshake", False):
            await super()._accept_connection(handler)
            return
        accept = self.compute_accept_value(headers.get("Sec-Websocket-Key") or "")
        handler.set_status(101)  # for the access line
        self.stream = handler.detach()  # public: the handler is finished, HTTP processing ends
        application = handler.application
        if _access_log.isEnabledFor(logging.INFO) or "log_function" in application.settings:
            application.log_request(handler)  # the line Tornado's finish() logs (redacted summary)
        self.handshake = b"%s%s\r\n\r\n" % (_UPGRADE, accept.encode("ascii"))
        self.start_pinging()
        try:
            opened = handler.open(*handler.open_args, **handler.open_kwargs)
            answer = self.take_handshake()
            if answer is not None:  # open() did not queue it (no session): write it now
                self.stream.write(answer)
            if opened is not None:
                await opened
        except Exception:
            handler.log_exception(*sys.exc_info())
            self._abort()
            return
        await self._receive_frame_loop()

    def _write_frame(self, fin: bool, opcode: int, data: bytes, flags: int = 0) -> "asyncio.Future[None]":
        transport = self.transport
        if transport is None or self.mask_outgoing or self._compressor is not None:
            answer = self.take_handshake()
            if answer is not None:  # a frame before open() queued the lean upgrade's 101: 101 first
                self.stream.write(answer)
            return super()._write_frame(fin, opcode, data, flags)  # before open(): the handshake
        if opcode & 0x8 and (not fin or len(data) > 125):
            raise ValueError("control frames may not be fragmented or exceed 125 bytes")
        whole = frame(data, (0x80 if fin else 0) | opcode | flags)
        self._wire_bytes_out += len(whole)
        return transport.send_frame(whole, opcode)

    def close(self, code: Optional[int] = None, reason: Optional[str] = None) -> None:
        handler: Any = self.handler
        handler.closing(code, self.client_terminated)
        super().close(code, reason)

    # --- the frame reader ---------------------------------------------------------------------
    # Tornado's own reader hands over only whole messages, pings and pongs, acts on unmasked
    # frames, echoes any close code and raises (a logged traceback) on a close reason that is not
    # UTF-8. This one replaces it (``_receive_frame``, called by Tornado's frame loop) so that:
    # every frame reaches the session, which counts it against the incoming rate (4008); a frame
    # that breaks RFC 6455 is answered with 1002 and not acted on; a text message or close reason
    # that is not UTF-8 with 1007; all of it logged at DEBUG only. Data messages, pings and pongs
    # still go through the handler's public callbacks (``on_message``, ``on_ping``, ``on_pong``),
    # continuation and close frames through ``handler.on_frame``.

    _fragments: Optional[bytearray] = None  # the message being received in fragments
    _fragments_opcode = 0

    async def _receive_frame(self) -> None:
        read = self._read_bytes
        head = await read(2)
        first, second = head[0], head[1]
        opcode = first & 0x0F
        control = opcode & 0x8
        n = second & 0x7F
        if n == 126:
            n = _unpack_short(await read(2))[0]
        elif n == 127:
            n = _unpack_long(await read(8))[0]
        problem = _frame_problem(first, second, n, self._fragments is not None)
        fragments = self._fragments
        if problem is None and not control and n + (len(fragments) if fragments is not None else 0) \
                > self.params.max_message_size:
            self.close(1009, "message too big")  # as Tornado: the close frame, then the connection ends
            self._abort()
            return
        if problem is not None and n > 125 + self.params.max_message_size:
            self._fail(1002, problem)  # not worth reading past: end it here
            self._abort()
            return
        if second & 0x80:
            mask = await read(4)
            data = _websocket_mask(mask, await read(n)) if n else b""
        else:
            data = await read(n) if n else b""
        if self.server_terminated:  # our close frame is out: only the peer's close matters now
            if opcode == _CLOSE and problem is None:
                self.client_terminated = True
                self.close()
            return
        if problem is not None:
            self._fail(1002, problem)
            return
        handler: Any = self.handler
        if opcode == _CLOSE:
            self._receive_close(handler, data)
            return
        if control:
            if opcode == 0x9:
                self._run_callback(handler.on_ping, data)
                self._send_pong(data)  # not once the session has closed (server_terminated)
            else:
                self._received_pong = True
                done = self._run_callback(handler.on_pong, data)
                if done is not None:
                    await done
            return
        if not first & 0x80:  # a fragment, not the last: counted, kept until the message is whole
            if opcode:
                self._fragments_opcode = opcode
                self._fragments = bytearray(data)
            else:
                assert fragments is not None
                fragments += data
            self._run_callback(handler.on_frame, 0, data)
            return
        if opcode == 0:
            assert fragments is not None
            fragments += data
            opcode, data = self._fragments_opcode, bytes(fragments)
            self._fragments = None
        self._message_bytes_in += len(data)
        if opcode == 0x1:
            try:
                message: Any = data.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(1007, "text message is not UTF-8")
                return
        else:
            message = data
        done = self._run_callback(handler.on_message, message)
        if done is not None:
            await done

    def _receive_close(self, handler: Any, data: bytes) -> None:
        """The peer's close frame (RFC 6455 §5.5.1, §7.4): counted like any frame, then echoed
        with its code, or answered with 1002 (a 1-byte payload, a code no endpoint may send)
        or 1007 (a reason that is not UTF-8)."""
        self._run_callback(handler.on_frame, _CLOSE, data)
        self.client_terminated = True
        code: Optional[int] = None
        reason: Optional[str] = None
        if len(data) == 1:
            self._fail(1002, "close frame with a 1-byte payload")
            return
        if len(data) >= 2:
            code = _unpack_code(data[:2])[0]
            if not valid_close_code(code):
                self._fail(1002, f"close code {code} is not one a peer may send")
                return
            try:
                reason = data[2:].decode("utf-8")
            except UnicodeDecodeError:
                self._fail(1007, "close reason is not UTF-8")
                return
        self.close_code, self.close_reason = code, reason
        self.close(code)  # echo the code (or none); the stream ends: the peer closed first

    def _fail(self, code: int, reason: str) -> None:
        """Refuse what the peer sent: close with ``code`` through the session (which counts the
        code as the close reason) and act on nothing more; once our close frame is out, a
        further violation ends the connection. DEBUG only: a peer must not fill the log."""
        log.debug("closing a WebSocket connection with %d: %s", code, reason)
        if self.server_terminated:
            self._abort()
            return
        session = getattr(self.handler, "session", None)
        if session is not None:
            session.close(code, reason)
        if not self.server_terminated:
            self.close(code, reason)

    async def _receive_frame_loop(self) -> None:
        """Read frames in a task of its own and return at once. Tornado awaits this loop at the
        bottom of the handshake's coroutine chain (``RequestHandler._execute`` -> ``get`` ->
        ``accept_connection``), which then stays suspended for the connection's whole life;
        letting that chain finish frees its frames and the request objects they hold."""
        self._reader = asyncio.ensure_future(self._read_frames())

    async def _read_frames(self) -> None:
        try:
            await super()._receive_frame_loop()
        except asyncio.CancelledError:
            self._abort()
        except Exception:  # what RequestHandler._execute did for the awaited loop: log, drop
            if not self.stream or not self.stream.io_loop.asyncio_loop.is_closed():  # type: ignore[attr-defined]
                self.handler.log_exception(*sys.exc_info())
            try:
                self._abort()
            except Exception:
                pass


class PublicProtocol(WebSocketProtocol13):
    """The fallback: Tornado's protocol as it is, plus the public ``close`` hook."""

    transport: Optional[Transport] = None

    def close(self, code: Optional[int] = None, reason: Optional[str] = None) -> None:
        handler: Any = self.handler
        handler.closing(code, self.client_terminated)
        super().close(code, reason)


def make_protocol(handler: Any, tornado_protocol: Any, cache: Any) -> Any:
    """Our protocol object in place of the one Tornado built (its version check and parameters
    are kept; the parameters are shared by every connection through ``cache._ws_params``)."""
    if tornado_protocol is None:
        return None
    if cache._ws_params is None:
        cache._ws_params = tornado_protocol.params
    cls = RealtimeProtocol if INTERNALS.protocol else PublicProtocol
    return cls(handler, False, cache._ws_params)


# --- memory of an idle connection -----------------------------------------------------------------

class _SmallQueue(list):
    """A list with ``popleft``: the queue operations IOStream uses (append, [0], [-1], popleft,
    clear, iteration), at 56 bytes empty instead of a deque's 760."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def shed_handshake_state(handler: Any, stream: Any) -> None:
    """Drop what only the HTTP handshake needed (headers, arguments, UI namespaces): a
    connection lives for hours and this is most of an idle connection's memory. The stream's two
    write queues (empty deques, 760 bytes each) become small lists when the internals are as
    expected; otherwise they stay as they are."""
    request = handler.request
    request.headers = _NO_HEADERS
    request.arguments = request.query_arguments = request.body_arguments = {}
    request.files = {}
    request.body = b""
    request.connection = request.server_connection = None  # the stream is detached
    handler._headers = _NO_HEADERS
    handler.ui = None
    handler.path_args = handler.open_args = ()
    handler.path_kwargs = handler.open_kwargs = {}
    if INTERNALS.stream:
        if not stream._write_futures:
            stream._write_futures = _SmallQueue()
        buffer = stream._write_buffer
        if buffer is not None and not buffer._buffers:
            buffer._buffers = _SmallQueue()


# --- the listening side (tornado_rt.listener) ------------------------------------------------------

def tcp_server_problems(server: Any) -> List[str]:
    """What differs in a ``TCPServer`` from what :class:`~tornado_rt.listener.GuardedHTTPServer`'s
    own accept loop relies on: the ``_sockets`` and ``_handlers`` dicts (fd -> listening socket,
    fd -> the callable that stops accepting on it, used by ``stop()``) and
    ``_handle_connection(connection, address)`` (TLS wrapping, IOStream, ``handle_stream``)."""
    problems = []
    for name in ("_sockets", "_handlers"):
        if type(getattr(server, name, None)) is not dict:
            problems.append(f"TCPServer.{name} is not a dict")
    if not callable(getattr(server, "_handle_connection", None)):
        problems.append("TCPServer._handle_connection is missing")
    return problems


_listener_warned = False


def can_adopt_listeners(server: Any) -> bool:
    """Whether the guarded accept loop may replace Tornado's on ``server`` (else one WARNING, and
    the caller uses the public ``TCPServer.add_sockets``: no pause at the file-descriptor limit)."""
    global _listener_warned
    problems = tcp_server_problems(server)
    if problems and not _listener_warned:
        _listener_warned = True
        import tornado
        log.warning("Tornado %s differs from what tornado-rt expects (%s); accepting with Tornado's "
                    "own loop instead: no back-off when the process runs out of file descriptors",
                    tornado.version, "; ".join(problems))
    return not problems


def adopt_listener(server: Any, sock: Any, remove: Any) -> None:
    """Register ``sock`` as ``server``'s listening socket, accepted by our own handler, which
    ``remove()`` stops (``server.stop()`` calls it). Only after :func:`can_adopt_listeners`."""
    server._sockets[sock.fileno()] = sock
    server._handlers[sock.fileno()] = remove


def handle_accepted(server: Any, connection: Any, address: Any) -> None:
    """Hand an accepted connection to ``server`` as Tornado's own accept loop would."""
    server._handle_connection(connection, address)


def head_timeout_problems(server: Any) -> List[str]:
    """What differs from what :func:`take_head_timeouts` relies on: ``server.conn_params`` is
    Tornado's ``HTTP1ConnectionParameters`` with a number ``header_timeout``, and
    ``HTTP1Connection._read_message`` reads the head without a timeout when it is None."""
    from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters

    params = getattr(server, "conn_params", None)
    if type(params) is not HTTP1ConnectionParameters or not isinstance(getattr(params, "header_timeout", None),
                                                                         (int, float)):
        return ["HTTPServer.conn_params.header_timeout is not a number"]
    try:  # the head is read in _read_message (Tornado < 6.5) or its _read_message_inner
        source = "".join(inspect.getsource(method) for method in (
            getattr(HTTP1Connection, name, None) for name in ("_read_message", "_read_message_inner"))
            if method is not None)
    except (OSError, TypeError):
        return ["HTTP1Connection._read_message has no source to check"]
    if "if self.params.header_timeout is None:" not in source:
        return ["HTTP1Connection._read_message does not skip its head timeout when header_timeout is None"]
    return []


_head_timeouts_warned = False


def take_head_timeouts(server: Any) -> bool:
    """Turn off Tornado's per-request head timeout on ``server`` (an ``HTTPServer``) so that the
    caller bounds every request head with its own deadline; False (and one WARNING) when Tornado
    differs, and Tornado's own timeout stays in force."""
    global _head_timeouts_warned
    problems = head_timeout_problems(server)
    if problems:
        if not _head_timeouts_warned:
            _head_timeouts_warned = True
            import tornado
            log.warning("Tornado %s differs from what tornado-rt expects (%s); Tornado's own head "
                        "timeout stays: more CPU per request", tornado.version, "; ".join(problems))
        return False
    server.conn_params.header_timeout = None
    return True


# --- the connect lane (tornado_rt.listener) ----------------------------------------------------------

def lane_problems(stream: Any = None) -> List[str]:
    """What differs from what the listener's connect lane relies on (``stream``: an IOStream
    instance to check as well):

    * ``IOStream._read_buffer`` (a bytearray) and ``_read_buffer_size`` (an int): the bytes the
      lane read are put back in front of them (:func:`unread`) when Tornado is to serve the request;
    * ``HTTP1Connection`` keeps the request's ``_request_start_line``, ``_request_headers`` and
      ``_disconnect_on_finish`` (which ``_read_message`` sets and ``write_headers`` reads), and its
      stream close callback is ``_on_connection_close``;
    * ``tornado.httpserver._HTTPRequestContext(stream, address, protocol, trusted_downstream)``:
      the request context ``HTTPServer.handle_stream`` builds;
    * ``RequestHandler._execute(transforms, *args, **kwargs)`` (a coroutine), what Tornado's
      ``_HandlerDelegate.execute`` runs (:func:`execute` takes its first step itself);
    * the cross-origin check of Tornado 6.6 (``WebSocketHandler.get`` calls
      ``self._check_cross_origin(self.check_origin)``, which reads ``Sec-Fetch-Site``, ``Origin``
      and ``Host``), which the lane's own check mirrors."""
    from tornado import httpserver
    from tornado.http1connection import HTTP1Connection
    from tornado.websocket import WebSocketHandler

    problems = []
    if stream is not None:
        if type(getattr(stream, "_read_buffer", None)) is not bytearray:
            problems.append("IOStream._read_buffer is not a bytearray")
        if type(getattr(stream, "_read_buffer_size", None)) is not int:
            problems.append("IOStream._read_buffer_size is not an int")
        if getattr(stream, "_user_read_buffer", False):
            problems.append("IOStream reads into a user buffer")
    context = getattr(httpserver, "_HTTPRequestContext", None)
    try:
        names = list(inspect.signature(context).parameters) if context is not None else []
    except (TypeError, ValueError):
        names = []
    if names[:4] != ["stream", "address", "protocol", "trusted_downstream"]:
        problems.append("tornado.httpserver._HTTPRequestContext differs")
    execute = getattr(RequestHandler, "_execute", None)
    if not inspect.iscoroutinefunction(execute):
        problems.append("RequestHandler._execute is not a coroutine function")
    if not callable(getattr(HTTP1Connection, "_on_connection_close", None)):
        problems.append("HTTP1Connection._on_connection_close is missing")
    try:
        init = inspect.getsource(HTTP1Connection.__init__)
        write_headers = inspect.getsource(HTTP1Connection.write_headers)
        get = inspect.getsource(WebSocketHandler.get)
        cross = inspect.getsource(getattr(RequestHandler, "_check_cross_origin"))
    except (OSError, TypeError, AttributeError):
        problems.append("Tornado's HTTP/1 connection or WebSocket handler has no source to check")
    else:
        for name in ("_request_start_line", "_request_headers", "_disconnect_on_finish"):
            if f"self.{name}" not in init or f"self.{name}" not in write_headers:
                problems.append(f"HTTP1Connection.{name} differs")
        # The publish lane drives a request as _read_message does: these flags and the future
        # that says the answer is written (or the connection closed).
        for name in ("_read_finished", "_write_finished", "_finish_future", "_body_timeout"):
            if f"self.{name}" not in init:
                problems.append(f"HTTP1Connection.{name} differs")
        if "self._check_cross_origin(self.check_origin)" not in get:
            problems.append("WebSocketHandler.get does not check the origin with _check_cross_origin")
        if not all(s in cross for s in ('"sec-fetch-site"', '"same-origin" | "none"', "_origin_matches_host")):
            problems.append("RequestHandler._check_cross_origin differs")
    return problems


def unread(stream: IOStream, data: bytes) -> None:
    """Put ``data`` (what a read of ``stream`` returned) back in front of its read buffer, so that
    the next read (Tornado's HTTP/1 connection) returns it again, followed by what came after.
    Only after :func:`lane_problems` found nothing for this stream, with no read pending."""
    stream._read_buffer[:0] = data
    stream._read_buffer_size += len(data)


class _SocketFamily:
    """What ``_HTTPRequestContext`` reads of a plain stream: ``stream.socket.family``, known
    from the accepted address (a 2-tuple for AF_INET, a 4-tuple for AF_INET6) instead of
    ``socket.family``'s enum conversion on every connection."""

    __slots__ = ("socket", "family")

    def __init__(self, family: Any) -> None:
        self.socket = self
        self.family = family


_FAMILIES = {2: _SocketFamily(_socket_module.AF_INET), 4: _SocketFamily(_socket_module.AF_INET6)}
#: ``tornado.httpserver._HTTPRequestContext`` and ``tornado.httputil._DEFAULT_PARSE_BODY_CONFIG``,
#: looked up once (None when missing: :func:`lane_problems` then reports it and there is no lane).
_REQUEST_CONTEXT: Any = getattr(_httpserver, "_HTTPRequestContext", None)
_PARSE_BODY_CONFIG: Any = getattr(_httputil, "_DEFAULT_PARSE_BODY_CONFIG", None)
_HOST: Any = getattr(getattr(_httputil, "_ABNF", None), "host", None)


def lane_context(stream: IOStream, address: Any, protocol: Optional[str], trusted_downstream: Any) -> Any:
    """The request context ``HTTPServer.handle_stream`` builds for a connection (remote_ip,
    protocol) of a plain (not TLS) stream."""
    standin = _FAMILIES.get(len(address)) if type(address) is tuple and stream.socket is not None else None
    return _REQUEST_CONTEXT(standin or stream, address, protocol, trusted_downstream)


def lane_request(connection: Any, start_line: RequestStartLine, headers: HTTPHeaders) -> HTTPServerRequest:
    """``HTTPServerRequest(connection=connection, start_line=start_line, headers=headers)``: the
    same request, its attributes set as Tornado 6.6's constructor sets them (Host checked with
    Tornado's own pattern, the query parsed with ``parse_qs_bytes``, its limit on fields and
    blank values kept, ``query_arguments`` a copy of ``arguments``) without the deprecation
    branches and the ``copy.deepcopy`` (about 3.5 us less per connect). When the constructor
    differs from the one this repeats (:func:`request_problems`), the constructor itself.
    Raises ``HTTPInputError`` where the constructor raises it (the lane then leaves the request
    to Tornado, which answers it)."""
    if not REQUEST:
        return HTTPServerRequest(connection=connection, start_line=start_line, headers=headers)
    request = HTTPServerRequest.__new__(HTTPServerRequest)
    request.method, request.uri, request.version = start_line
    request.headers = headers or HTTPHeaders()
    request.body = b""
    context = getattr(connection, "context", None)
    request.remote_ip = getattr(context, "remote_ip", None)
    request.protocol = getattr(context, "protocol", "http")
    try:
        host = headers["Host"]
    except KeyError:
        raise _httputil.HTTPInputError("Missing Host header") from None
    if not _HOST.fullmatch(host):
        raise _httputil.HTTPInputError("Invalid Host header: %r" % host)
    if "," in host:
        raise _httputil.HTTPInputError("Multiple host headers not allowed: %r" % host)
    request.host = host
    request.host_name = _httputil.split_host_and_port(host.lower())[0]
    request.files = {}
    request.connection = connection
    request.server_connection = None
    request._start_time = time.time()
    request._finish_time = None
    request.path, _, request.query = start_line.path.partition("?")
    try:
        arguments = parse_qs_bytes(request.query, keep_blank_values=True,
                                   max_num_fields=_PARSE_BODY_CONFIG.urlencoded.max_arguments)
    except Exception as e:
        raise _httputil.HTTPInputError("Invalid query string: %s" % e) from e
    request.arguments = arguments
    request.query_arguments = {name: list(values) for name, values in arguments.items()}
    request.body_arguments = {}
    return request


#: The text of Tornado 6.6's ``HTTPServerRequest.__init__`` (whitespace collapsed), which
#: :func:`lane_request` repeats.
_REQUEST_INIT_SHA256 = "7869e50852e8cfe49ba0ee941416813c63b882de1b83222c6cba6c00cb02ec58"


def request_problems(cls: Any = HTTPServerRequest) -> List[str]:
    """What differs in ``HTTPServerRequest.__init__`` from the one :func:`lane_request`
    repeats (its text, exactly), or in the private names it uses: ``tornado.httputil._ABNF.host``
    (the Host pattern) and ``_DEFAULT_PARSE_BODY_CONFIG`` (the query's limit on fields)."""
    if _PARSE_BODY_CONFIG is None or _HOST is None:
        return ["tornado.httputil._DEFAULT_PARSE_BODY_CONFIG or _ABNF.host is missing"]
    try:
        source = " ".join(inspect.getsource(cls.__init__).split())
    except (OSError, TypeError):
        return ["HTTPServerRequest.__init__ has no source to check"]
    if hashlib.sha256(source.encode()).hexdigest() != _REQUEST_INIT_SHA256:
        return ["HTTPServerRequest.__init__ differs"]
    return []


def _check_built(name: str, problems: List[str]) -> bool:
    """Whether the lane builds ``name`` itself; one WARNING when Tornado differs. Where there is
    no source to check (a frozen executable) it falls back silently, as ``clear_handler`` does
    (the lane's own check then turns the lane off, with its WARNING, at the first connection)."""
    if problems and not any("no source" in problem for problem in problems):
        log.warning("Tornado %s differs from what tornado-rt expects (%s); the connect lane builds %s "
                    "Tornado's way: more CPU per connect", tornado.version, "; ".join(problems), name)
    return not problems


#: The lane's request is built by :func:`lane_request` (else by Tornado's constructor).
REQUEST = _check_built("its requests", request_problems())


class _Rest:
    """Awaited by a task, continues a coroutine that was stepped once outside any task and is
    suspended on ``waiting`` (what it yielded): the task waits on that, then sends (or throws)
    into the coroutine what it would have sent (or thrown) into it had it run it from the start."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Any, waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.waiting
        self.waiting = None
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the task (a cancellation, the future's error)
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                value = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _rest(coro: Any, waiting: Any) -> Any:
    return await _Rest(coro, waiting)


def _lane_connection_class() -> Any:
    from tornado.http1connection import HTTP1Connection

    class LaneConnection(HTTP1Connection):
        """The HTTP/1 connection of a request whose head the listener read itself (the lane): in
        the state Tornado's ``_read_message`` leaves it after reading a head (start line, headers;
        the close callback once :meth:`begin` is called), but no request loop reads a next
        request. ``on_detach(stream)`` is called when the WebSocket takes the stream. A response
        written on an upgrade's connection (none is expected: the lane takes only upgrades that
        succeed) closes the connection once sent. With ``keep_alive`` (the publish lane: an
        HTTP/1.1 request without ``Connection: close``), the answer, written by Tornado's own
        ``write_headers`` / ``write`` / ``finish``, leaves the connection open for the next
        request exactly as Tornado's request loop would (closed instead when the answer comes
        before the body was read, as Tornado's ``finish`` decides)."""

        on_detach: Any = None

        def __init__(self, stream: IOStream, params: Any, context: Any, start_line: Any,
                     headers: HTTPHeaders, keep_alive: bool = False) -> None:
            super().__init__(stream, False, params, context)
            self._request_start_line = start_line
            self._request_headers = headers
            self._disconnect_on_finish = not keep_alive

        def begin(self, on_detach: Any) -> None:
            """The request is the lane's: the stream's close reaches it (and its handler)."""
            self.on_detach = on_detach
            self.stream.set_close_callback(self._on_connection_close)

        def detach(self) -> IOStream:
            stream = super().detach()
            if self.on_detach is not None:
                self.on_detach(stream)
            return stream

    return LaneConnection


LaneConnection = _lane_connection_class()


def execute(handler: Any, transforms: List[Any], loop: Any) -> "Optional[asyncio.Future[None]]":
    """Run ``handler`` as Tornado's ``_HandlerDelegate.execute`` does (``_execute``, which
    handles its own errors), its first step now instead of in a new task of ``loop``: None when
    it finished in that step (the lane's upgrade whose ``open()`` answers at once: no task, no
    loop turn), else a task of ``loop`` running the rest. What ``_execute`` lets escape (it
    catches every Exception itself) is raised, here or by the task."""
    coro = handler._execute(transforms)
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_rest(coro, waiting))


_raw_family = _socket.socket.family  # the C getter: an int, without socket.family's enum conversion
_INET = (_socket_module.AF_INET, _socket_module.AF_INET6)


def set_nodelay(stream: IOStream) -> None:
    """``stream.set_nodelay(True)`` (real-time: no Nagle delay on small frames), with the
    socket's family read without its enum conversion; any error goes through Tornado's own
    ``set_nodelay``, which decides what to ignore."""
    sock = stream.socket
    if sock is not None and type(sock) is _socket_module.socket and _raw_family.__get__(sock) in _INET:
        try:
            sock.setsockopt(_socket_module.IPPROTO_TCP, _socket_module.TCP_NODELAY, 1)
            return
        except OSError:
            pass
    stream.set_nodelay(True)


# --- HTTPHeaders built at once ----------------------------------------------------------------------

def headers_problems(cls: Any = HTTPHeaders) -> List[str]:
    """What differs in ``HTTPHeaders`` from what :func:`make_headers` repeats: a new one holds
    ``_as_list`` and ``_combined_cache`` (dicts, empty) and nothing else, and setting a field
    stores ``[value]`` and ``value`` under its Http-Header-Case name."""
    try:
        init = " ".join(inspect.getsource(cls.__init__).split())
        setitem = " ".join(inspect.getsource(cls.__setitem__).split())
    except (OSError, TypeError):
        return ["HTTPHeaders has no source to check"]
    assigned = set(re.findall(r"self\.(\w+)(?:: [^=]+)? =", init))
    if assigned != {"_as_list", "_combined_cache"} or "self._as_list: dict[str, list[str]] = {}" not in init \
            or "self._combined_cache: dict[str, str] = {}" not in init:
        return ["HTTPHeaders.__init__ differs"]
    if not setitem.endswith("norm_name = _normalize_header(name) self._combined_cache[norm_name] = value "
                            "self._as_list[norm_name] = [value]"):
        return ["HTTPHeaders.__setitem__ differs"]
    return []


#: Headers are built at once by :func:`make_headers` (else one field at a time).
HEADERS = _check_built("its headers", headers_problems())


def make_headers(fields: Dict[str, str]) -> HTTPHeaders:
    """``HTTPHeaders`` holding ``fields`` (names already in Http-Header-Case, one value each):
    what ``h = HTTPHeaders()`` and ``h[name] = value`` for each field make, built at once
    instead of through ``MutableMapping.update`` and a call per field. With an ``HTTPHeaders``
    that differs (:func:`headers_problems`), built that way."""
    if not HEADERS:
        headers = HTTPHeaders()
        for name, value in fields.items():
            headers[name] = value
        return headers
    headers = HTTPHeaders.__new__(HTTPHeaders)
    headers._combined_cache = dict(fields)
    headers._as_list = {name: [value] for name, value in fields.items()}
    return headers


# --- RequestHandler.clear with the Date of the current second -------------------------------------

def clear_problems(cls: Any = RequestHandler) -> List[str]:
    """What differs in ``RequestHandler.clear`` from what :func:`clear_handler` repeats (it sets
    ``_headers`` to Server, Content-Type and Date, calls ``set_default_headers``, and resets
    ``_write_buffer``, ``_status_code`` and ``_reason``)."""
    try:
        source = inspect.getsource(cls.clear)
    except (OSError, TypeError):
        return ["RequestHandler.clear has no source to check"]
    body = " ".join(source.split())
    expected = ('self._headers = httputil.HTTPHeaders( { "Server": "TornadoServer/%s" % tornado.version, '
                '"Content-Type": "text/html; charset=UTF-8", "Date": httputil.format_timestamp(time.time()), } ) '
                'self.set_default_headers() self._write_buffer: list[bytes] = [] self._status_code = 200 '
                'self._reason = httputil.responses[200]')
    return [] if body.endswith(expected) else ["RequestHandler.clear differs"]


CLEAR = not clear_problems()
_SERVER_HEADER = "TornadoServer/%s" % tornado.version
_date_cache: List[Any] = [0, ""]


def clear_handler(handler: Any) -> bool:
    """``RequestHandler.clear()`` with the ``Date`` header formatted once per second (the same
    text: it has a resolution of one second); False when Tornado's differs (call its own)."""
    if not CLEAR:
        return False
    now = time.time()
    second = int(now)
    if _date_cache[0] != second:
        _date_cache[0], _date_cache[1] = second, format_timestamp(now)
    handler._headers = make_headers({"Server": _SERVER_HEADER, "Content-Type": "text/html; charset=UTF-8",
                                     "Date": _date_cache[1]})
    handler.set_default_headers()
    handler._write_buffer = []
    handler._status_code = 200
    handler._reason = responses[200]
    return True
