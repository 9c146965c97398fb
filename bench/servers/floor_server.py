"""The floor of the ``http-pages`` scenario: what delivering one message to one of many
connections costs at least in Python, one ``socket.send()`` of one frame.

It accepts the load client's connections with the smallest Baserow subset (the upgrade answered
101, an ``authentication`` message, ``page_add`` for each ``page`` frame) and keeps, per
connection, a plain ``socket`` on the same file descriptor. ``POST /api/publish`` on
``--http-port`` (served by common.HttpApi) is not parsed as JSON: the messages are cut out of the
body at the ``},{"message":`` separators the bench writes, and each is sent as one frame with one
``socket.send()`` to the next connection, round-robin in table-id order, which is the order the
bench spreads its batches over the pages. No validation, no routing lookup, no serialization:
a bare Python loop of ``socket.send()``.

The ``latency`` scenario's floor: the publish trigger (``/bench/publish``, common.py) queues each
message's frame, built once, for every subscriber of its table and schedules one flush for the
loop iteration, which joins each connection's queued frames and writes them with one
``socket.send()`` (tornado-rt's hub does the same: one send per connection per loop iteration,
publishes that arrive while a flush runs share the next one). No JSON parsing of client frames
beyond the subscribe, no permission check, no history: the least work in Python that delivers
every publish to 1,000 subscribers in order.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
OPEN, SEP, CLOSE = b'[{"message":', b'},{"message":', b"}]"

subscribers: Dict[int, List[socket.socket]] = {}  # table id -> every subscribed socket
pending: Dict[socket.socket, List[bytes]] = {}  # frames queued for the next flush
order: List[socket.socket] = []
fallbacks = [0]  # sends that did not fit the socket buffer (finished through the transport)


def frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


class Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.open = False
        self.transport = None
        self.sock = None
        self.publisher = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end].decode("latin-1")
            key = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                       if line.lower().startswith("sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
            self.transport.write(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                 f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode())
            if head.startswith("GET " + common.PUBLISH_PATH):
                self.publisher = True  # the bench's publish trigger: no token
            else:
                token = head.split("jwt_token=", 1)[1].split(" ", 1)[0] if "jwt_token=" in head else None
                if common.decode_token(token) is None:
                    self.transport.write(frame(common.dumps(common.AUTH_FAILED).encode()))
                    self.transport.close()
                    return
                self.transport.write(frame(common.dumps(common.auth_ok("floor")).encode()))
            self.open = True
            buf = buf[end + 4:]
        while len(buf) >= 6:  # client frames: masked, up to 65535 bytes
            n = buf[1] & 0x7F
            start = 6
            if n == 126:
                if len(buf) < 8:
                    break
                n, start = int.from_bytes(buf[2:4], "big"), 8
            elif n > 126:
                raise ValueError("client frame too large for the floor server")
            if len(buf) < start + n:
                break
            text_frame = buf[0] & 0x0F == 1  # not a close frame
            mask, payload = buf[start - 4:start], buf[start:start + n]
            text = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            buf = buf[start + n:]
            if self.publisher and text_frame:
                _publish(text)
            elif b'"table_id"' in text:
                table_id = int(common.json.loads(text)["table_id"])
                self.transport.write(frame(common.dumps(common.page_add(table_id)).encode()))
                if self.sock is None:
                    self.sock = socket.socket(fileno=os.dup(self.transport.get_extra_info("socket").fileno()))
                subscribers.setdefault(table_id, []).append(self.sock)
                order.clear()
        self.buf = buf

    def connection_lost(self, exc) -> None:
        if self.sock is not None:
            for socks in subscribers.values():
                if self.sock in socks:
                    socks.remove(self.sock)
            pending.pop(self.sock, None)
            order.clear()
            self.sock.close()


cursor = [0]
flush_scheduled = [False]


def _publish(raw: bytes) -> None:
    """One trigger frame: each message's frame queued for every subscriber of its table."""
    seq, rounds, t0, n, ts = common.parse_trigger(raw)
    for r in range(rounds):
        for table_id in range(t0, t0 + n):
            socks = subscribers.get(table_id)
            if not socks:
                continue
            data = frame(common.dumps(common.rows_updated(table_id, seq + r, ts or time.time_ns() // 1000)).encode())
            for sock in socks:
                queued = pending.get(sock)
                if queued is None:
                    pending[sock] = [data]
                else:
                    queued.append(data)
    if pending and not flush_scheduled[0]:
        flush_scheduled[0] = True
        asyncio.get_running_loop().call_soon(_flush)


def _flush() -> None:
    """One ``socket.send()`` per connection of everything queued for it."""
    flush_scheduled[0] = False
    batch = list(pending.items())
    pending.clear()
    for sock, frames in batch:
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            fallbacks[0] += 1
            _finish(sock, data[sent:])


def on_http(method: bytes, path: bytes, body: bytes):
    if method != b"POST" or path != b"/api/publish":
        return 404, b'{"error":"not found","field":null}'
    if not order:
        # http-pages: one subscriber per page, the pages in table-id order
        order.extend(subscribers[t][-1] for t in sorted(subscribers) if subscribers[t])
    if not (body.startswith(OPEN) and body.endswith(CLOSE)) or not order:
        return 400, b'{"error":"not a bench batch","field":null}'
    messages = body[len(OPEN):-len(CLOSE)].split(SEP)
    i, n = cursor[0], len(order)
    for m in messages:
        data = frame(m)
        try:
            sent = order[i].send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):  # the kernel buffer is full: let asyncio finish it (counted)
            fallbacks[0] += 1
            _finish(order[i], data[sent:])
        i = i + 1 if i + 1 < n else 0
    cursor[0] = i
    return 200, b'{"published":%d}' % len(messages)


def _finish(sock: socket.socket, rest: bytes) -> None:
    """Send the rest blocking (the flag is on the shared file description: restored at once)."""
    sock.setblocking(True)
    try:
        sock.sendall(rest)
    finally:
        sock.setblocking(False)


async def main() -> None:
    args = common.cli(__doc__)
    common.prepare_process(args.lifetime)
    loop = asyncio.get_running_loop()
    await loop.create_server(Conn, "127.0.0.1", args.port, backlog=1024)
    await loop.create_server(lambda: common.HttpApi(on_http), "127.0.0.1", args.http_port, backlog=128)
    common.mark_ready(args.ready_file, args.port)
    try:
        await asyncio.Event().wait()
    finally:
        print(f"sends finished blocking: {fallbacks[0]}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
