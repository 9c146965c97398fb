"""Where the CPU of one ``POST /api/publish`` goes, without sockets (issue 16 item 2).

The ``http-single`` scenario of bench/run.py measures server CPU per request over a real
socket, where the system calls (read, write, epoll) are most of it and the machine's noise is
large. This tool runs the same requests through the same Python stack in one process, minus the
system calls: Tornado's ``HTTP1ServerConnection`` request loop on a stream whose reads and writes
complete at once, behind

* ``bare``: a plain ``HTTPServer`` with the bare handler of bench/servers/bare_tornado_http.py;
* ``rt``: the tornado-rt application of ``tornado-rt serve`` (``make_app``, metrics on, log
  level WARNING) behind the ``GuardedHTTPServer`` it runs;
* ``rt-plain``: the same application behind a plain ``HTTPServer`` (what the listener's guard
  costs is ``rt`` minus ``rt-plain``);
* ``rt-no-body-timeout``: ``rt`` with the connection parameters' ``body_timeout`` off (Tornado
  then reads the body without ``gen.with_timeout``, which runs the body read as a task of its own);

and prints the CPU µs per request of each, best of ``--repeat`` rounds, alternating. The
request is the ``http-single`` one (a ~570-byte ``rows_updated`` to a page nobody watches).

    python bench/http_single_layers.py [--requests 20000] [--repeat 5] [--profile out.prof]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
import time
from typing import Any, Callable, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "servers"))
sys.path.insert(1, os.path.dirname(HERE))

import common  # noqa: E402
from tornado import iostream  # noqa: E402
from tornado.concurrent import Future  # noqa: E402
from tornado.httpserver import HTTPServer  # noqa: E402
from tornado.web import Application  # noqa: E402

import bare_tornado_http  # noqa: E402

SECRET, API_KEY = common.SECRET, common.API_KEY


class LoopbackStream:
    """Enough of an ``IOStream`` for ``HTTP1ServerConnection``: every read is the next request
    (head, then body), complete at once; writes are counted and dropped; after ``n`` requests
    the stream reports itself closed."""

    def __init__(self, head: bytes, body: bytes, n: int, done: Callable[[], None]):
        import socket
        self.io_loop = __import__("tornado.ioloop", fromlist=["IOLoop"]).IOLoop.current()
        self.socket: Optional[Any] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.head, self.body, self.left, self.done = head, body, n, done
        self.written: List[bytes] = []
        self._closed = False
        self._close_callback: Any = None
        self.error: Optional[BaseException] = None
        self.max_buffer_size = 100 * 1024 * 1024

    def read_until_regex(self, regex: bytes, max_bytes: Optional[int] = None) -> "Future[bytes]":
        f: "Future[bytes]" = Future()
        if self.left <= 0:
            self.close()
            f.set_exception(iostream.StreamClosedError())
        else:
            self.left -= 1
            f.set_result(self.head)
        return f

    def read_bytes(self, num_bytes: int, partial: bool = False) -> "Future[bytes]":
        f: "Future[bytes]" = Future()
        f.set_result(self.body[:num_bytes])
        return f

    def write(self, data: Any) -> "Future[None]":
        if len(self.written) < 2:
            self.written.append(bytes(data))
        f: "Future[None]" = Future()
        f.set_result(None)
        return f

    def set_nodelay(self, value: bool) -> None:
        pass

    def set_close_callback(self, callback: Any) -> None:
        self._close_callback = callback

    def closed(self) -> bool:
        return self._closed

    def close(self, exc_info: Any = False) -> None:
        if not self._closed:
            self._closed = True
            if self.socket is not None:
                self.socket.close()
                self.socket = None
            self.done()


def request(body: bytes) -> bytes:
    return (b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (API_KEY.encode(), len(body)))


def body_of() -> bytes:
    text = common.dumps(common.rows_updated_large(1, 2, 3)).encode()
    return b'{"message":' + text + b"}"


def make_rt(guarded: bool) -> Any:
    from tornado_rt import Settings
    from tornado_rt.httpapi import make_app
    from tornado_rt.listener import GuardedHTTPServer
    from tornado_rt.server import RealtimeServer

    server = RealtimeServer(Settings(jwt_secret=SECRET), load_entry_points=False)
    server.directory.set_workspace(1, range(1, 11))
    for t in range(1, 11):
        server.directory.set_table(t, 1)
    app = make_app(server, [API_KEY])
    http = GuardedHTTPServer(app, settings=server.settings, max_header_size=160 * 1024) if guarded else HTTPServer(app)
    return http, server


async def run(kind: str, n: int, holder: dict) -> float:
    body = body_of()
    if kind == "bare":
        http: Any = HTTPServer(Application([(r"/api/publish", bare_tornado_http.Publish)]))
    else:
        http, server = make_rt(kind != "rt-plain")
        if kind == "rt-no-body-timeout":
            http.conn_params.body_timeout = None
        await server.start()
    finished = asyncio.get_running_loop().create_future()
    stream = LoopbackStream(request(body), body, n, lambda: finished.done() or finished.set_result(None))
    gc.collect()
    t0 = time.process_time()
    http.handle_stream(stream, ("127.0.0.1", 40000))
    await asyncio.wait_for(finished, 120)
    t1 = time.process_time()
    answer = stream.written[0] if stream.written else b""
    if not answer.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"{kind}: unexpected answer {answer[:300]!r}")
    holder.setdefault("answers", {})[kind] = answer
    return (t1 - t0) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--kinds", default="bare,rt,rt-plain")
    p.add_argument("--profile", help="cProfile the first of --kinds into this file instead")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)  # as `tornado-rt serve --log-level warning`
    from tornado_rt import tune_gc
    tune_gc()
    kinds = args.kinds.split(",")
    holder: dict = {}
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
        asyncio.run(run(kinds[0], args.requests, holder))
        prof.disable()
        prof.dump_stats(args.profile)
        return
    best = {k: float("inf") for k in kinds}
    for r in range(args.repeat):
        for k in kinds:
            us = asyncio.run(run(k, args.requests, holder))
            best[k] = min(best[k], us)
            print(f"round {r + 1}: {k:9s} {us:7.2f} µs/request", flush=True)
    print("best:", "  ".join(f"{k} {v:.2f} µs" for k, v in best.items()))
    if "bare" in best:
        for k in kinds:
            if k != "bare":
                print(f"{k} - bare = {best[k] - best['bare']:.2f} µs/request ({best[k] / best['bare']:.2f}x)")
    for k, a in holder.get("answers", {}).items():
        head = a.split(b"\r\n\r\n")[0].decode()
        print(f"{k}: {head!r}")


if __name__ == "__main__":
    main()
