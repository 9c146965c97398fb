"""The lean load client: a minimal asyncio WebSocket client and the worker process that runs many.

Per connection it does the HTTP upgrade itself, reads the ``authentication`` message, sends its
``page`` subscriptions, waits for each ``page_add`` and from then on only walks frame headers,
counts text frames, and reads the ``"seq":`` number of the first and the last message of every
read with ``bytes.find`` (they must continue the previous read and span exactly the number of
messages counted; together with the exact per-connection count at the end this catches loss,
duplication and reordering). When latency is on it also reads each message's ``"ts":``. No JSON
parsing on the data path. Pings are answered with pongs. Nothing else.

A worker process (:func:`worker_main`) owns a share of the connections, takes commands from the
benchmark process over a pipe and publishes two numbers into shared memory: how many
data messages its connections received in total, and the smallest per-connection count (the
publisher's flow-control window is based on the latter, so no connection is ever more than the
window behind). Both are written as soon as they change.
"""
from __future__ import annotations

import array
import asyncio
import base64
import json
import os
import resource
import signal
import struct
import sys
import threading
import time
from typing import List, Optional, Sequence, Tuple

_KEY = base64.b64encode(b"tornado-rt-bench").decode()
_MASK = b"\x37\xfa\x21\x3d"  # client frames must be masked; a constant key is fine for a benchmark

# Connection states.
HANDSHAKE, AUTH, SUBSCRIBING, STREAMING, CLOSED = range(5)

# Wire protocols: Baserow's (every server but one) and Centrifuge v0.15's JSON protocol (the Go
# reference, servers/centrifuge_server.go): connect with {"id":1}, subscribe with
# {"id":K,"method":1,"params":{"channel":"table-N"}}; every reply and push is one JSON line ending
# in a newline, and the server packs up to 4 of them into one WebSocket frame.
BASEROW, CENTRIFUGE = "baserow", "centrifuge"
WS_PATHS = {BASEROW: "/ws/core/", CENTRIFUGE: "/connection/websocket"}


def _lines(payload: bytes) -> List[bytes]:
    return [line for line in payload.split(b"\n") if line]


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked, unfragmented client frame (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = (_MASK * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big") if n else b""
    return head + _MASK + body


def _seq(buf: bytes, at: int) -> Optional[int]:
    """The ``"seq":N`` number near offset ``at`` (the front of a benchmark message, or of a
    Centrifuge push that wraps one), or None."""
    p = buf.find(b'"seq":', at, at + 128)
    if p < 0:
        return None
    return int(buf[p + 6:buf.find(b",", p, p + 32)])


def upgrade_request(port: int, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


class Stats:
    """Per-worker aggregates updated on the hot path.

    ``hist`` maps a per-connection message count to how many connections have it, so the smallest
    count (``min``) advances in amortized O(1) as frames arrive and is published to the shared
    array at once: the publisher's flow control reacts within its own polling interval.
    """

    __slots__ = ("total", "reads", "latency", "lat_on", "lat_from", "unexpected", "closed_while_streaming", "hist",
                 "min", "shared_total", "shared_min", "index")

    def __init__(self, shared_total=None, shared_min=None, index: int = 0) -> None:
        self.total = 0
        self.reads = 0  # reads that carried data messages: total / reads = messages per socket read
        self.latency = array.array("q")
        self.lat_on = False
        self.lat_from = 0
        self.unexpected = 0
        self.closed_while_streaming = 0
        self.hist = {}
        self.min = 0
        self.shared_total = shared_total if shared_total is not None else [0]
        self.shared_min = shared_min if shared_min is not None else [0]
        self.index = index if shared_total is not None else 0

    def register(self, conn: "WSConn") -> None:
        self.hist[conn.count] = self.hist.get(conn.count, 0) + 1
        self._reset_min()

    def unregister(self, conn: "WSConn") -> None:
        k = self.hist.get(conn.count, 0)
        if k <= 1:
            self.hist.pop(conn.count, None)
        else:
            self.hist[conn.count] = k - 1
        self._reset_min()

    def _reset_min(self) -> None:
        self.min = min(self.hist) if self.hist else 0
        self.shared_min[self.index] = self.min


class WSConn(asyncio.Protocol):
    """One client connection. ``pages``: table ids to subscribe to after authentication."""

    __slots__ = ("stats", "transport", "buf", "state", "count", "last", "bad", "pending_pages",
                 "pages", "request", "ready", "error", "web_socket_id", "publisher", "lazy", "packed")

    def __init__(self, stats: Stats, request: bytes, pages: Sequence[int], ready: asyncio.Future,
                 publisher: bool = False, proto: str = BASEROW):
        self.stats = stats
        self.transport = None
        self.buf = b""
        self.state = HANDSHAKE
        self.count = 0
        self.last = -1
        self.bad = 0
        self.pages = pages
        self.pending_pages = len(pages)
        self.request = request
        self.ready = ready
        self.error: Optional[str] = None
        self.web_socket_id: Optional[str] = None
        self.publisher = publisher
        self.lazy = False  # read in batches (paused between the worker's periodic resumes)
        # Centrifuge: a text frame carries one or more newline-terminated JSON lines; every line
        # of a data frame is one publication (counted, sequence-checked, timed like a frame).
        self.packed = proto == CENTRIFUGE

    # --- asyncio callbacks ----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)
        self.request = None

    def connection_lost(self, exc) -> None:
        if self.state == STREAMING and not self.publisher:
            self.stats.closed_while_streaming += 1
        if self.state != CLOSED:
            self._fail(f"connection lost in state {self.state}")
        self.state = CLOSED

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.state == HANDSHAKE:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            status = buf[:buf.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self._fail("handshake refused: " + status.decode("latin-1"))
                self.transport.close()
                return
            buf = buf[end + 4:]
            if self.publisher:
                self.state = STREAMING
                self._set_ready()
            else:
                self.state = AUTH
                if self.packed:  # Centrifuge: the client speaks first (connect command)
                    self.transport.write(masked_frame(b'{"id":1}'))
        stats = self.stats
        n = len(buf)
        i = 0
        frames = 0
        first = last = -1
        lat = stats.latency if stats.lat_on and not self.lazy else None
        now = time.time_ns() // 1000 if lat is not None else 0
        streaming = self.state == STREAMING
        packed = self.packed
        while n - i >= 2:
            ln = buf[i + 1]
            if ln < 126:
                h = i + 2
            elif ln == 126:
                if n - i < 4:
                    break
                ln = (buf[i + 2] << 8) | buf[i + 3]
                h = i + 4
            else:
                if n - i < 10:
                    break
                ln = int.from_bytes(buf[i + 2:i + 10], "big")
                h = i + 10
            end = h + ln
            if end > n:
                break
            if streaming and buf[i] == 0x81 and packed:
                # One publication per newline-terminated line; the last one starts after the
                # last inner newline.
                k = buf.count(b"\n", h, end)
                if end > h and buf[end - 1] != 0x0A:
                    k += 1
                frames += k
                if first < 0:
                    first = h
                p = buf.rfind(b"\n", h, end - 1)
                last = p + 1 if p >= 0 else h
                if lat is not None:
                    q = h
                    while q < end:
                        p = buf.find(b'"seq":', q, end)
                        if p < 0:
                            break
                        t = buf.find(b'"ts":', p, end)
                        if int(buf[p + 6:t - 1]) >= stats.lat_from:
                            lat.append(now - int(buf[t + 5:buf.find(b",", t, end)]))
                        q = buf.find(b"\n", t, end)
                        if q < 0:
                            break
            elif streaming and buf[i] == 0x81:
                frames += 1
                if first < 0:
                    first = h
                last = h
                if lat is not None:
                    p = buf.find(b'"seq":', h, end)
                    t = buf.find(b'"ts":', p, end)
                    if int(buf[p + 6:t - 1]) >= stats.lat_from:
                        lat.append(now - int(buf[t + 5:buf.find(b",", t, end)]))
            else:
                self._control(buf[i], buf[h:end])
                streaming = self.state == STREAMING
            i = end
        self.buf = buf[i:] if i < n else b""
        if frames:
            self._counted(buf, frames, first, last)
        if self.lazy and self.state == STREAMING:
            self.transport.pause_reading()

    def _counted(self, buf: bytes, frames: int, first: int, last: int) -> None:
        """Account ``frames`` data messages of one read; check the sequence numbers of the first and
        the last (they must continue the previous read and span exactly ``frames`` numbers)."""
        stats = self.stats
        s_first = _seq(buf, first)
        s_last = _seq(buf, last) if last != first else s_first
        if s_first is None or s_last is None:
            stats.unexpected += frames
            return
        if s_first != self.last + 1 or s_last - s_first != frames - 1:
            self.bad += 1
        self.last = s_last
        old = self.count
        count = self.count = old + frames
        stats.total += frames
        stats.reads += 1
        hist = stats.hist
        k = hist[old]
        if k == 1:
            del hist[old]
        else:
            hist[old] = k - 1
        hist[count] = hist.get(count, 0) + 1
        if old == stats.min and old not in hist:
            m = old + 1
            while m not in hist:
                m += 1
            stats.min = m
            stats.shared_min[stats.index] = m
        stats.shared_total[stats.index] = stats.total

    # --- control frames and setup ---------------------------------------------------------------
    def _control(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if opcode == 0x9:  # ping
            self.transport.write(masked_frame(payload, 0xA))
            return
        if opcode == 0x8:  # close
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            if self.state == STREAMING and not self.publisher:
                self.stats.closed_while_streaming += 1
            self._fail(f"closed by server (code {code})")
            self.state = CLOSED
            self.transport.close()
            return
        if opcode == 0xA:
            return
        if opcode != 0x1 or not b0 & 0x80:
            self.stats.unexpected += 1
            return
        if self.packed:
            self._centrifuge_reply(payload)
        elif self.state == AUTH:
            try:
                msg = json.loads(payload)
            except ValueError:
                msg = {}
            if msg.get("type") != "authentication" or msg.get("success") is not True:
                self._fail(f"authentication failed: {payload[:200]!r}")
                self.transport.close()
                return
            self.web_socket_id = msg.get("web_socket_id")
            if not self.pages:
                self.state = STREAMING
                self._set_ready()
                return
            self.state = SUBSCRIBING
            self.transport.write(b"".join(
                masked_frame(b'{"page":"table","table_id":%d}' % t) for t in self.pages))
        elif self.state == SUBSCRIBING:
            try:
                msg = json.loads(payload)
            except ValueError:
                msg = {}
            if msg.get("type") != "page_add":
                self.stats.unexpected += 1
                return
            self.pending_pages -= 1
            if self.pending_pages == 0:
                self.state = STREAMING
                self._set_ready()
        else:
            self.stats.unexpected += 1

    def _centrifuge_reply(self, payload: bytes) -> None:
        """Connect and subscribe replies of Centrifuge's JSON protocol (one or more lines)."""
        for line in _lines(payload):
            try:
                msg = json.loads(line)
            except ValueError:
                msg = {}
            if not isinstance(msg, dict) or "error" in msg or "result" not in msg:
                self._fail(f"refused: {line[:200]!r}")
                self.transport.close()
                return
            if self.state == AUTH and msg.get("id") == 1:
                self.web_socket_id = msg["result"].get("client")
                if not self.pages:
                    self.state = STREAMING
                    self._set_ready()
                    continue
                self.state = SUBSCRIBING
                self.transport.write(b"".join(
                    masked_frame(b'{"id":%d,"method":1,"params":{"channel":"table-%d"}}' % (k + 2, t))
                    for k, t in enumerate(self.pages)))
            elif self.state == SUBSCRIBING and isinstance(msg.get("id"), int) and msg["id"] >= 2:
                self.pending_pages -= 1
                if self.pending_pages == 0:
                    self.state = STREAMING
                    self._set_ready()
            else:
                self.stats.unexpected += 1

    def _set_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(True)

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        if not self.ready.done():
            self.ready.set_result(False)

    def send_text(self, payload: bytes) -> None:
        self.transport.write(masked_frame(payload))

    def close(self) -> None:
        self.state = CLOSED
        if self.transport is not None:
            self.transport.abort()


async def open_connection(port: int, path: str, stats: Stats, pages: Sequence[int] = (),
                          publisher: bool = False, timeout: float = 30.0, proto: str = BASEROW) -> WSConn:
    """Connect, authenticate and subscribe; the returned connection has ``error`` set on failure."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    conn = WSConn(stats, upgrade_request(port, path), pages, ready, publisher, proto)
    stats.register(conn)
    try:
        await asyncio.wait_for(loop.create_connection(lambda: conn, "127.0.0.1", port), timeout)
        await asyncio.wait_for(asyncio.shield(ready), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        conn._fail(f"{type(exc).__name__}: {exc}")
        conn.close()
    return conn


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the worker process ---------------------------------------------------------------------------
class Worker:
    """Owns a share of the connections; driven by commands from the benchmark process.

    Commands (tuples over the pipe) and replies:
    ``("prepare", specs[, proto])`` -> ``("prepared", n)``: specs are ``(user_id, (table ids...))`` or
    ``(user_id, (table ids...), port)`` (default: the worker's port); proto is ``"baserow"``
    (default) or ``"centrifuge"``; makes the JWTs now so that token creation stays out of any
    timing.
    ``("connect", concurrency)`` -> ``("connected", ok, failed, t_first, t_last, errors)``: opens
    the prepared connections, at most ``concurrency`` handshakes in flight; times are
    ``time.time()`` of the first attempt and of the last completed setup.
    ``("latency", from_seq or None)`` -> ``("ok",)``: record latencies of messages with seq >=
    from_seq (None stops recording). ``("lazy", sample, period)`` -> ``("ok",)``: only every
    sample-th connection reads (and records latency) as data arrives, the others every period s. ``("report", expected)`` -> ``("report", dict)``.
    ``("exit",)`` closes everything and ends the process.
    """

    def __init__(self, index: int, commands, replies, totals, mins, port: int, lifetime: float):
        self.index = index
        self.commands = commands
        self.replies = replies
        self.totals = totals
        self.mins = mins
        self.port = port
        self.deadline = time.monotonic() + lifetime
        self.parent = os.getppid()
        self.stats = Stats(totals, mins, index)
        self.conns: List[WSConn] = []
        self.prepared: List[Tuple[bytes, Sequence[int], int]] = []  # (upgrade request, tables, port)
        self.proto = BASEROW
        self.done: Optional[asyncio.Future] = None
        #: While latencies are recorded: how late (µs) this worker's loop ran a 5 ms timer, each
        #: time. A late timer is a late read too: the client's own share of the latency.
        self.lag = array.array("q")
        self.lag_probe: Optional[asyncio.Future] = None

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        # Commands are read by a thread with blocking pipe calls (an event loop may make the fd
        # non-blocking, which breaks multiprocessing's framing for large messages).
        reader = threading.Thread(target=self._read_commands, args=(loop,), daemon=True)
        reader.start()
        ticker = asyncio.ensure_future(self._tick())
        try:
            await self.done
        finally:
            ticker.cancel()
            for conn in self.conns:
                conn.close()
            await asyncio.sleep(0)

    def _read_commands(self, loop) -> None:
        while True:
            try:
                cmd = self.commands.recv()
            except (EOFError, OSError):
                cmd = ("exit",)
            try:
                loop.call_soon_threadsafe(self._on_command, cmd)
            except RuntimeError:  # loop closed
                return
            if cmd[0] == "exit":
                return

    def _stop(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            if os.getppid() != self.parent or time.monotonic() > self.deadline:
                self._stop()
                return

    def _on_command(self, cmd: tuple) -> None:
        name = cmd[0]
        if name == "prepare":
            from common import make_token  # bench/servers is on sys.path
            self.proto = cmd[2] if len(cmd) > 2 else BASEROW
            path = WS_PATHS[self.proto]
            self.prepared = []
            for spec in cmd[1]:  # the whole upgrade request built now, outside any timing
                port = spec[2] if len(spec) > 2 else self.port
                self.prepared.append((upgrade_request(port, f"{path}?jwt_token={make_token(spec[0])}"),
                                      tuple(spec[1]), port))
            self.replies.send(("prepared", len(self.prepared)))
        elif name == "connect":
            asyncio.ensure_future(self._connect(cmd[1]))
        elif name == "latency":
            self.stats.lat_on = cmd[1] is not None
            if cmd[1] is not None:
                self.stats.lat_from = cmd[1]
                self.stats.latency = array.array("q")
                self.lag = array.array("q")
                if self.lag_probe is None:
                    self.lag_probe = asyncio.ensure_future(self._probe_lag())
            elif self.lag_probe is not None:
                self.lag_probe.cancel()
                self.lag_probe = None
            self.replies.send(("ok",))
        elif name == "lazy":
            asyncio.ensure_future(self._lazy(cmd[1], cmd[2]))
            self.replies.send(("ok",))
        elif name == "report":
            self.replies.send(("report", self._report(cmd[1])))
        elif name == "exit":
            self._stop()

    async def _connect(self, concurrency: int, timeout: float = 300.0) -> None:
        """Open the prepared connections with ``concurrency`` runners, each opening one at a time
        (no task, semaphore or ``wait_for`` per connection: the client's own CPU per connect is
        part of what a connect storm measures, for every server alike)."""
        specs, self.prepared = self.prepared, []
        loop = asyncio.get_running_loop()
        stats = self.stats
        proto = self.proto
        t_first = time.time()
        t_last = [t_first]
        conns: List[WSConn] = []
        todo = iter(specs)

        async def runner() -> None:
            for request, pages, port in todo:
                ready = loop.create_future()
                conn = WSConn(stats, request, pages, ready, False, proto)
                stats.register(conn)
                conns.append(conn)
                try:
                    await loop.create_connection(lambda: conn, "127.0.0.1", port)
                    await ready
                except OSError as exc:
                    conn._fail(f"{type(exc).__name__}: {exc}")
                    conn.close()
                t_last[0] = time.time()

        runners = [asyncio.ensure_future(runner()) for _ in range(max(1, min(concurrency, len(specs))))]
        _, late = await asyncio.wait(runners, timeout=timeout)
        for task in late:
            task.cancel()
        for conn in conns:
            if conn.error is None and not conn.ready.done():
                conn._fail(f"TimeoutError: not set up within {timeout:.0f} s")
        ok = [c for c in conns if c.error is None]
        failed = [c for c in conns if c.error is not None]
        self.conns.extend(ok)
        for c in failed:
            c.close()
            stats.unregister(c)
        errors = sorted({c.error for c in failed if c.error})[:5]
        self.replies.send(("connected", len(ok), len(failed), t_first, t_last[0], errors))

    async def _probe_lag(self, period: float = 0.005) -> None:
        clock = time.perf_counter
        while True:
            due = clock() + period
            await asyncio.sleep(period)
            self.lag.append(int((clock() - due) * 1e6))

    async def _lazy(self, sample: int, period: float, slices: int = 10) -> None:
        """Keep every ``sample``-th connection reading at once (its latency is recorded) and let
        the others read only every ``period`` s: they still count every message, but a read
        then carries several, so the client costs less and disturbs the measurement less. The
        lazy ones are resumed in ``slices`` groups spread over the period, not all at once: one
        burst of reads on every lazy connection kept the loop busy for ~10 ms, and each reading
        connection's data (the sampled ones') waited behind it."""
        lazy = [c for i, c in enumerate(self.conns) if i % sample]
        for c in lazy:
            c.lazy = True
        groups = [lazy[k::slices] for k in range(slices)]
        step = period / slices
        while not self.done.done():
            for group in groups:
                for c in group:
                    if c.state == STREAMING and c.transport is not None and not c.transport.is_closing():
                        c.transport.resume_reading()
                await asyncio.sleep(step)

    def _report(self, expected: Optional[int]) -> dict:
        counts = [c.count for c in self.conns]
        out = {
            "connections": len(self.conns),
            "received": sum(counts),
            "min": min(counts) if counts else 0,
            "max": max(counts) if counts else 0,
            "order_errors": sum(c.bad for c in self.conns),
            "unexpected": self.stats.unexpected,
            "reads": self.stats.reads,
            "closed": self.stats.closed_while_streaming,
            "errors": sorted({c.error for c in self.conns if c.error})[:5],
            "latency": self.stats.latency.tobytes(),
            "lag": self.lag.tobytes(),
        }
        if expected is not None:
            out["lost"] = sum(expected - c for c in counts if c < expected)
            out["extra"] = sum(c - expected for c in counts if c > expected)
        return out


def worker_main(index: int, commands, replies, totals, mins, port: int, lifetime: float,
                servers_dir: str) -> None:
    """Entry point of a client process (multiprocessing target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark process handles Ctrl-C and ends us
    sys.path.insert(0, servers_dir)
    raise_nofile()
    try:
        import uvloop  # optional: a cheaper event loop keeps the client further from being the bottleneck
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(Worker(index, commands, replies, totals, mins, port, lifetime).main())
