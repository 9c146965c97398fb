"""A WebSocket client done by hand over a plain socket, for the hardening tests.

The ordinary clients (Tornado's, ``websockets``) always read and always answer pings. To play a
client that *stops reading*, never answers a ping, or vanishes with a TCP reset, the tests need
the socket itself: :class:`RawClient` does the HTTP upgrade by hand, sends masked frames, reads
frames only when asked, and can reset the connection (``SO_LINGER`` 0, then close).

It uses the running asyncio loop's ``sock_*`` calls on a non-blocking socket, so it can share
the loop with the server under test (pytest-tornado's ``gen_test``).
"""
import asyncio
import base64
import os
import socket
import ssl
import struct
from typing import Any, Optional, Tuple

import ujson

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def client_frame(payload: bytes, opcode: int = TEXT, fin: bool = True, masked: bool = True,
                 rsv: int = 0) -> bytes:
    """A client-to-server frame (RFC 6455 §5.2) around ``payload``: masked, as a client must,
    unless ``masked`` is false; ``rsv`` sets the three reserved bits (0-7)."""
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | opcode
    bit = 0x80 if masked else 0
    if n < 126:
        header = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return header + payload
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask_fast(payload, mask)
    return header + mask + body


def _mask_fast(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


class HandshakeRefused(Exception):
    """The server answered the upgrade with an HTTP status other than 101 (``status``)."""

    def __init__(self, status: int, head: bytes):
        super().__init__(f"upgrade refused with HTTP {status}")
        self.status = status
        self.head = head


class RawClient:
    """One hand-made WebSocket connection. Create with :meth:`connect`."""

    def __init__(self, sock: socket.socket, buffered: bytes, tls: Optional[ssl.SSLObject] = None,
                 bios: Optional[Tuple[ssl.MemoryBIO, ssl.MemoryBIO]] = None):
        self.sock = sock
        self.buf = buffered
        self.loop = asyncio.get_running_loop()
        self.tls = tls  # TLS done by hand too (memory BIOs), so reading stays under our control
        self.bios = bios

    @classmethod
    async def connect(cls, port: int, query: str, rcvbuf: Optional[int] = None,
                      path: str = "/ws/core/", headers: str = "",
                      tls: Optional[ssl.SSLContext] = None) -> "RawClient":
        """Upgrade ``ws://127.0.0.1:port{path}{query}`` (``wss://`` with a client ``tls``
        context); raises :class:`HandshakeRefused` on a non-101 answer. ``rcvbuf`` sets a small
        ``SO_RCVBUF`` before connecting."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        client = cls(sock, b"")
        if tls is not None:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            client.tls = tls.wrap_bio(incoming, outgoing, server_hostname="localhost")
            client.bios = (incoming, outgoing)
            while True:
                try:
                    client.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await client._send_tls()
                    data = await loop.sock_recv(sock, 65536)
                    if not data:
                        raise HandshakeRefused(0, b"")
                    incoming.write(data)
            await client._send_tls()
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path}{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                   f"{headers}\r\n")
        await client.send_raw(request.encode("latin-1"))
        while b"\r\n\r\n" not in client.buf:
            if not await client._fill(len(client.buf) + 1):
                sock.close()
                raise HandshakeRefused(0, client.buf)
        head, rest = client.buf.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            sock.close()
            raise HandshakeRefused(status, head)
        client.buf = rest
        return client

    async def _send_tls(self) -> None:
        assert self.bios is not None
        data = self.bios[1].read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    def _received(self, chunk: bytes) -> None:
        """Network bytes in: append what they carry (decrypted under TLS) to the buffer."""
        if self.tls is None:
            self.buf += chunk
            return
        assert self.bios is not None
        self.bios[0].write(chunk)
        while True:
            try:
                data = self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return
            if not data:
                return
            self.buf += data

    # --- sending --------------------------------------------------------------------------------
    async def send_raw(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
            await self._send_tls()
            return
        await self.loop.sock_sendall(self.sock, data)

    async def send(self, obj: Any) -> None:
        """Send a text frame: ``obj`` as JSON, or a str as it is."""
        text = obj if isinstance(obj, str) else ujson.dumps(obj)
        await self.send_raw(client_frame(text.encode()))

    # --- receiving ------------------------------------------------------------------------------
    async def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = await self.loop.sock_recv(self.sock, 65536)
            if not chunk:
                return False
            self._received(chunk)
        return True

    def recv_now(self) -> bytes:
        """Read what has already arrived, without waiting and without letting the loop run
        (raises ``BlockingIOError`` when nothing has); it is kept for :meth:`recv_frame`.
        Returns the network bytes read (empty at end of stream)."""
        chunk = self.sock.recv(65536)
        self._received(chunk)
        return chunk

    async def recv_frame(self) -> Optional[Tuple[int, bytes]]:
        """The next frame as ``(opcode, payload)``, or None at end of stream."""
        if not await self._fill(2):
            return None
        first, second = self.buf[0], self.buf[1]
        n, offset = second & 0x7F, 2
        if n == 126:
            if not await self._fill(4):
                return None
            n, offset = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            if not await self._fill(10):
                return None
            n, offset = struct.unpack("!Q", self.buf[2:10])[0], 10
        if not await self._fill(offset + n):
            return None
        payload = self.buf[offset:offset + n]
        self.buf = self.buf[offset + n:]
        return first & 0x0F, payload

    async def recv(self) -> Any:
        """The next text message, decoded (pings are skipped without an answer)."""
        while True:
            frame = await self.recv_frame()
            assert frame is not None, "connection closed"
            opcode, payload = frame
            if opcode == TEXT:
                return ujson.loads(payload)
            assert opcode == PING, f"unexpected frame {opcode}: {payload[:80]!r}"

    async def close_code(self) -> Optional[int]:
        """Read to the end: the code of the server's close frame, or None if the stream ended
        (EOF or reset) without one."""
        try:
            while True:
                frame = await self.recv_frame()
                if frame is None:
                    return None
                if frame[0] == CLOSE:
                    return struct.unpack("!H", frame[1][:2])[0] if len(frame[1]) >= 2 else 1005
        except ConnectionResetError:
            return None

    # --- ending ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Abort the TCP connection with a reset (SO_LINGER 0, then close)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()
