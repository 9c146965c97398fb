"""tornado-rt as an operator runs it: the standalone ``tornado-rt serve`` (``python -m tornado_rt
serve``, docs/server-api.md) with the bench's JWT secret and API key, its directory loaded through
its own HTTP API (``PUT /api/directory``: workspace 1 = users 1..--users, tables 1..--tables in
it) before the ready file is written. Used by the HTTP scenarios (``http-pages``,
``http-single``, ``redis-pages``), which publish through ``POST /api/publish``.

``--uvloop``: install uvloop's event loop policy first (Tornado runs on asyncio, so ``serve``'s
``asyncio.run`` then runs on uvloop). ``--broker redis://...``: passed on to ``serve``.
"""
from __future__ import annotations

import http.client
import json
import os
import runpy
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import common  # noqa: E402


def load_directory(port: int, users: int, tables: int, ready_file: str, deadline: float) -> None:
    """Wait for /healthz, PUT the directory, then mark the server ready (a thread: ``serve``
    owns the main thread)."""
    body = json.dumps({"workspaces": {"1": list(range(1, users + 1))},
                       "tables": {str(t): 1 for t in range(1, tables + 1)}}).encode()
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("PUT", "/api/directory", body, {"Content-Type": "application/json",
                                                 "Authorization": f"Bearer {common.API_KEY}"})
    answer = conn.getresponse()
    text = answer.read()
    if answer.status != 200:
        print(f"PUT /api/directory: {answer.status} {text[:300]!r}", flush=True)
        os._exit(1)
    common.mark_ready(ready_file, port)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--broker", help="redis://host:port/db (default: in-process)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    args = parser.parse_args()
    common.prepare_process(args.lifetime)
    if args.uvloop:
        import asyncio

        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        print(f"event loop: uvloop {uvloop.__version__}", flush=True)
    argv = ["tornado-rt", "serve", "--port", str(args.port), "--jwt-secret", common.SECRET,
            "--api-key", common.API_KEY, "--log-level", "warning"]
    if args.broker:
        argv += ["--broker", args.broker]
    threading.Thread(target=load_directory, daemon=True,
                     args=(args.port, args.users, args.tables, args.ready_file, time.monotonic() + 60)).start()
    sys.argv = argv
    runpy.run_module("tornado_rt", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
