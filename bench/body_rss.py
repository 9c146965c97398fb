#!/usr/bin/env python
"""Memory of ``tornado-rt serve`` under request bodies sent where none is taken (issue 10, item 3).

    python bench/body_rss.py                      # the tornado-rt importable from here
    PYTHONPATH=/path/to/other/checkout python bench/body_rss.py   # another version, to compare

Starts a server, then sends ``--count`` bodies of ``--size`` MiB at once to ``GET /healthz``
(every sender pushes its whole body as fast as the server takes it), then ``--ws-count`` bodies
of ``--ws-size`` MiB to the WebSocket upgrade path. Prints the server's RSS before, its peak
(VmHWM) and RSS after each round, and the answers the senders got. Not a test: numbers only.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

MIB = 1024 * 1024


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M).group(1))


def send_body(port: int, head: bytes, size: int, answers: Counter) -> None:
    chunk = b"x" * MIB
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(head)
            sent = 0
            try:
                while sent < size:
                    sock.sendall(chunk[: min(MIB, size - sent)])
                    sent += MIB
            except OSError:
                pass  # the server answered and closed: the rest of the body is not wanted
            try:
                data = sock.recv(200)
            except OSError as exc:
                answers[f"error {exc.__class__.__name__}"] += 1
                return
            answers[data.split(b"\r\n", 1)[0].decode("latin1") or "EOF"] += 1
    except OSError as exc:
        answers[f"error {exc.__class__.__name__}"] += 1


def round_(port: int, pid: int, label: str, head: bytes, count: int, size: int) -> None:
    before = status_kib(pid, "VmRSS")
    answers: Counter = Counter()
    threads = [threading.Thread(target=send_body, args=(port, head, size, answers)) for _ in range(count)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    peak = status_kib(pid, "VmHWM")
    after = status_kib(pid, "VmRSS")
    print(f"{label}: RSS before {before / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, after {after / 1024:.0f} MiB "
          f"({elapsed:.1f} s); answers: {dict(answers)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--size", type=int, default=10, help="MiB per body to /healthz")
    parser.add_argument("--ws-count", type=int, default=5)
    parser.add_argument("--ws-size", type=int, default=99, help="MiB per body to the upgrade path")
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("TORNADO_RT_")}
    proc = subprocess.Popen([sys.executable, "-m", "tornado_rt", "serve", "--port", "0", "--jwt-secret", "s" * 32,
                             "--api-key", "k" * 32, "--log-level", "error"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            cwd="/")  # not this directory: -m would import its tornado_rt first
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://[^:]+:(\d+)/", line).group(1))
        where = subprocess.run([sys.executable, "-c", "import tornado_rt; print(tornado_rt.__file__)"], env=env,
                               cwd="/", capture_output=True, text=True).stdout.strip()
        print(f"server: {where}, pid {proc.pid}", flush=True)
        size = args.size * MIB
        head = (f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n\r\n").encode()
        round_(port, proc.pid, f"{args.count} x {args.size} MiB to GET /healthz", head, args.count, size)
        ws_size = args.ws_size * MIB
        ws_head = (f"GET /ws/core/?jwt_token=anonymous HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   f"Content-Length: {ws_size}\r\n\r\n").encode()
        round_(port, proc.pid, f"{args.ws_count} x {args.ws_size} MiB to the upgrade path", ws_head,
               args.ws_count, ws_size)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
