"""What every benchmark server shares: the payload, the JWT check, the directory, the CLI.

Each server under test is a separate process started by ``bench/run.py``; they all speak the
same minimal subset of the Baserow WebSocket protocol (docs/protocol.md §1-§2):

* ``GET /ws/core/?jwt_token=<JWT>`` -> ``{"type":"authentication","success":true,"web_socket_id":...}``
  (bad token: ``success:false`` and close 4001);
* ``{"page":"table","table_id":N}`` -> ``{"type":"page_add","page":"table","parameters":{"table_id":N}}``
  when the user may view table N (every table 1..--tables is in workspace 1, whose members are
  users 1..--users).

and one benchmark-only endpoint, identical everywhere, so the publish trigger costs the same:

* ``GET /bench/publish`` (WebSocket, no auth, loopback only). Each text frame
  ``{"seq":S,"rounds":R,"t0":T,"n":N}`` makes the server publish R x N ``rows_updated``
  messages: for r in 0..R-1, for t in T..T+N-1: message(table_id=t, seq=S+r, ts=TS) to the
  ``table`` page of table t. TS is the frame's ``"ts"`` when it has one (the latency scenario
  sends the wall-clock microsecond the publish was scheduled for), else ``time.time_ns()//1000``
  taken right before each publish. Nothing is sent back on this socket. With ``"large":1`` in
  the frame the message is :func:`rows_updated_large` (~570 bytes) instead (tornado-rt only: the
  embedded variant of the ``http-pages`` scenario).

The HTTP scenarios (``http-pages``, ``http-single``, ``redis-pages``) publish instead through
``POST /api/publish`` with tornado-rt's body (docs/server-api.md): an array of envelopes
``{"message": <rows_updated_large>}`` whose audience is the message type's default (the
``table`` page of ``table_id``). tornado-rt answers it with its own HTTP API (``tornado-rt
serve``, servers/tornado_rt_serve.py); the references that have no HTTP server of their own
serve it with :class:`HttpApi` below on ``--http-port``.

The seq and the timestamp sit at the front of the message so the load client can read them
without parsing JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jwt

SECRET = "tornado-rt-bench-secret-0123456789abcdef"  # HS256 shared secret (bench only)
ALGORITHMS = ["HS256"]
PUBLISH_PATH = "/bench/publish"


def rows_updated(table_id: int, seq: int, ts_us: int) -> Dict[str, Any]:
    """A realistic Baserow ``rows_updated`` message (~300 bytes as compact JSON)."""
    return {
        "type": "rows_updated",
        "seq": seq,
        "ts": ts_us,
        "table_id": table_id,
        "rows_before_update": [{"id": 1042, "order": "1042.00000000000000000000",
                                "field_5521": "Acme Corp", "field_5522": "Open"}],
        "rows": [{"id": 1042, "order": "1042.00000000000000000000",
                  "field_5521": "Acme Corp", "field_5522": "Won"}],
        "metadata": {},
        "updated_field_ids": [5522],
    }


def rows_updated_large(table_id: int, seq: int, ts_us: int) -> Dict[str, Any]:
    """The ``http-pages`` payload: a ``rows_updated`` of a row with more fields, ~570 bytes as
    compact JSON (issue 16's measurement shape); ``seq`` and ``ts`` at the front as above."""
    before = {"id": 1042, "order": "1042.00000000000000000000", "field_5521": "Acme Corp",
              "field_5522": "Open", "field_5523": "2026-11-30", "field_5524": 125000,
              "field_5525": "Renewal of the plan",
              "field_5526": [{"id": 7, "value": "EMEA"}]}
    return {
        "type": "rows_updated",
        "seq": seq,
        "ts": ts_us,
        "table_id": table_id,
        "rows_before_update": [before],
        "rows": [dict(before, field_5522="Won")],
        "metadata": {},
        "updated_field_ids": [5522],
    }


API_KEY = "tornado-rt-bench-api-key"  # the standalone tornado-rt's --api-key (bench only)


def parse_trigger(raw: Any):
    """``(seq, rounds, t0, n, ts)`` of a publish trigger frame; ``ts`` is None unless the
    publisher fixed the timestamp (latency scenario: the time the publish was scheduled for)."""
    t = json.loads(raw)
    return int(t["seq"]), int(t["rounds"]), int(t["t0"]), int(t["n"]), t.get("ts")


def decode_token(token: Optional[str]) -> Optional[int]:
    """User id of a valid Baserow-style access token (HS256, ``exp`` required,
    ``token_type`` == access when present), else None. Same checks as tornado-rt's default."""
    if not token or len(token) > 8192:
        return None
    try:
        claims = jwt.decode(token, SECRET, algorithms=ALGORITHMS, options={"require": ["exp"]})
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    if claims.get("token_type", "access") != "access":
        return None
    user_id = claims.get("user_id")
    return user_id if isinstance(user_id, int) else None


def make_token(user_id: int, lifetime: int = 3600) -> str:
    return jwt.encode({"user_id": user_id, "exp": int(time.time()) + lifetime, "token_type": "access"},
                      SECRET, algorithm="HS256")


class Directory:
    """The references' access check: tables 1..tables in workspace 1, members 1..users."""

    def __init__(self, users: int, tables: int):
        self.members = set(range(1, users + 1))
        self.tables = {t: 1 for t in range(1, tables + 1)}

    def can_view_table(self, user_id: int, table_id: Any) -> bool:
        return type(table_id) is int and table_id in self.tables and user_id in self.members


def page_add(table_id: Any) -> Dict[str, Any]:
    return {"type": "page_add", "page": "table", "parameters": {"table_id": table_id}}


AUTH_FAILED = {"type": "authentication", "success": False, "web_socket_id": None}


def auth_ok(web_socket_id: str) -> Dict[str, Any]:
    return {"type": "authentication", "success": True, "web_socket_id": web_socket_id}


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class HttpApi(asyncio.Protocol):
    """A minimal HTTP/1.1 server for the references without one of their own (no framework, so
    it costs as little as an HTTP endpoint can): keep-alive, ``Content-Length`` bodies only,
    every request answered by ``handler(method, path, body) -> (status, json bytes)``.

        loop.create_server(lambda: HttpApi(handler), "127.0.0.1", port)
    """

    def __init__(self, handler: Callable[[bytes, bytes, bytes], Tuple[int, bytes]]):
        self.handler = handler
        self.transport: Any = None
        self.buf = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            length = 0
            p = head.lower().find(b"\r\ncontent-length:")
            if p >= 0:
                q = head.find(b"\r\n", p + 2)
                length = int(head[p + 17:q if q >= 0 else len(head)])
            if len(buf) < end + 4 + length:
                break
            body = buf[end + 4:end + 4 + length]
            buf = buf[end + 4 + length:]
            method, path = head.split(b" ", 2)[:2]
            try:
                status, out = self.handler(method, path, body)
            except Exception as exc:  # a bad request must not end the benchmark server
                status, out = 400, dumps({"error": str(exc), "field": None}).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s"
                                 % (status, b"OK" if status == 200 else b"Error", len(out), out))
        self.buf = buf


# --- process plumbing -----------------------------------------------------------------------------
def cli(description: str) -> argparse.Namespace:
    return parser(description).parse_args()


def parser(description: str) -> argparse.ArgumentParser:
    """The options every server takes (a server may add its own before parsing)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--users", type=int, default=20000, help="members of workspace 1 (user ids 1..N)")
    p.add_argument("--tables", type=int, default=20000, help="tables 1..N, all in workspace 1")
    p.add_argument("--ready-file", help="written once the server listens")
    p.add_argument("--lifetime", type=float, default=1800.0, help="exit by itself after this many seconds")
    p.add_argument("--http-port", type=int, help="serve POST /api/publish on this port (references without "
                   "an HTTP server of their own; see HttpApi)")
    return p


def prepare_process(lifetime: float) -> None:
    """Raise RLIMIT_NOFILE to the hard limit and make sure this process ends by itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    timer = threading.Timer(lifetime, lambda: os.kill(os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()


def mark_ready(path: Optional[str], port: int) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()} {port}\n")
        os.replace(tmp, path)
    print(f"READY pid={os.getpid()} port={port}", flush=True)

