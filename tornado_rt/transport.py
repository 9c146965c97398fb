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
* ``WebSocketProtocol13._receive_frame_loop()`` (a coroutine): run as a task of its own, so that
  the handshake's coroutine chain finishes (about 2 KiB less per idle connection).
* ``RequestHandler._headers``: dropped with the rest of the handshake state.
* ``TCPServer._sockets`` / ``_handlers`` (dicts) and ``TCPServer._handle_connection``: the
  listener's own accept loop (:mod:`tornado_rt.listener`: back-off at the file-descriptor limit)
  registers its listening sockets there and hands accepted connections on as Tornado would.

They are checked once: the protocol class at import, the stream on the first connection. When
something differs (a Tornado upgrade), one WARNING is logged and the public API is used
instead: no direct sends (every byte through ``IOStream.write``, which keeps order by itself),
the outgoing-buffer limit through ``IOStream.max_write_buffer_size``, Tornado's own frame
writing and frame loop, the deques left as they are, Tornado's own accept loop. Slower and
bigger, never wrong.
``tests/test_tornado_contract.py`` fails loudly when any of these changes.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import struct
import sys
from typing import Any, List, Optional

from tornado.httputil import HTTPHeaders
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError
from tornado.websocket import WebSocketProtocol13

log = logging.getLogger("tornado_rt.transport")

_NO_HEADERS = HTTPHeaders()
_CLOSE = 0x8
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


def frame_header(fin: bool, opcode: int, n: int, flags: int = 0) -> bytes:
    """The header of an unmasked server-to-client frame (RFC 6455 §5.2) of ``n`` payload bytes."""
    first = (0x80 if fin else 0) | opcode | flags
    if n < 126:
        return bytes((first, n))
    if n < 65536:
        return _pack_short(first, 126, n)
    return _pack_long(first, 127, n)


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
    sends, buffer sizes and small queues are used (None until the first stream is checked)."""

    def __init__(self) -> None:
        problems = protocol_problems()
        self.protocol = not problems
        self.stream: Optional[bool] = None
        if problems:
            self.fall_back(problems)

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

    __slots__ = ("protocol", "stream", "sock", "out", "closed", "_direct")

    def __init__(self, protocol: Any, out: list, max_buffer: int = 0):
        self.protocol = protocol
        self.stream = stream = protocol.stream
        self.out = out
        self.closed = False
        internals = INTERNALS.check_stream(stream) and INTERNALS.protocol
        self._direct = internals
        # Direct sends only on plain TCP: TLS bytes must go through the SSL stream.
        self.sock = stream.socket if internals and stream.__class__ is IOStream else None
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
        out.clear()
        if self.closed:
            return 0
        stream = self.stream
        sock = self.sock
        if sock is not None and stream._total_write_index == stream._total_write_done_index:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0  # full (EAGAIN) or gone: IOStream.write finds out which
            if sent == len(data):
                return 0
            if sent:
                data = memoryview(data)[sent:]
        try:
            stream.write(data)
        except StreamClosedError:
            self.closed = True
            return 0
        except StreamBufferFullError:
            return sys.maxsize  # the public API's limit (fallback): over the limit
        if self._direct:
            return stream._total_write_index - stream._total_write_done_index
        return 0

    def send_frame(self, frame: bytes, opcode: int) -> "asyncio.Future[None]":
        """Write one of Tornado's own frames after everything queued; Tornado's contract:
        returns a Future, raises ``StreamClosedError`` when the stream is gone."""
        if self.closed:
            raise StreamClosedError()
        out = self.out
        out.append(frame)
        data = b"".join(out)
        out.clear()
        if opcode == _CLOSE:
            self.closed = True  # RFC 6455 §5.5.1: nothing after the close frame
        stream = self.stream
        sock = self.sock
        if sock is not None and stream._total_write_index == stream._total_write_done_index:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                done.set_result(None)
                return done
            if sent:
                data = memoryview(data)[sent:]  # type: ignore[assignment]
        return stream.write(data)

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


# --- Tornado's protocol, adapted ---------------------------------------------------------------

class RealtimeProtocol(WebSocketProtocol13):
    """Tornado's RFC 6455 protocol with its frames written by the :class:`Transport`, its frame
    loop run as a task, and the session told the moment the server starts closing (a limit, a
    force disconnect, shutdown, an oversized frame, or the echo of the client's own close), so
    nothing is queued after the close frame and subscriptions are released at once."""

    transport: Optional[Transport] = None

    def _write_frame(self, fin: bool, opcode: int, data: bytes, flags: int = 0) -> "asyncio.Future[None]":
        transport = self.transport
        if transport is None or self.mask_outgoing or self._compressor is not None:
            return super()._write_frame(fin, opcode, data, flags)  # before open(): the handshake
        if opcode & 0x8 and (not fin or len(data) > 125):
            raise ValueError("control frames may not be fragmented or exceed 125 bytes")
        frame = frame_header(fin, opcode, len(data), flags) + data
        self._wire_bytes_out += len(frame)
        return transport.send_frame(frame, opcode)

    def close(self, code: Optional[int] = None, reason: Optional[str] = None) -> None:
        handler: Any = self.handler
        handler.closing(code, self.client_terminated)
        super().close(code, reason)

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


def make_protocol(handler: Any, tornado_protocol: Optional[WebSocketProtocol13], cache: Any) -> Any:
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
