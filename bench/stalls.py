#!/usr/bin/env python
"""How long one expensive publish freezes ``tornado-rt serve`` for everybody else (issue 10,
items 6 and 9). Not a test: numbers only.

    python bench/stalls.py drops      # 3,000 connections x 2 pages; group_deleted of 500-table
                                      # workspaces nobody has open, then one everybody has open
    python bench/stalls.py batch      # a maximal batch: 100,000 envelopes in 9 MiB
    PYTHONPATH=/path/to/other/checkout python bench/stalls.py drops   # another version, to compare

``drops``: loads a directory (workspace 1: users 1..--connections, tables 1..2,000; workspaces
2..--rounds+1: --tables tables each, no member connected), connects --connections WebSockets
(user i subscribes to tables 1 + i % 1000 and 1001 + i % 1000), then publishes ``group_deleted``
for each of the unwatched workspaces through ``POST /api/publish``. Reported per round: the time
of that request (it is answered after the side effect ran, so it is the effect's cost plus one
HTTP round trip) and the largest latency a bystander saw meanwhile (a thread sending
``GET /healthz`` over a kept-alive connection in a loop). Last, ``group_deleted`` of workspace 1
itself: every connection loses both pages (6,000 ``page_discard``): the cost that is
proportional to what is dropped. "In the server" is the time the router took to dispatch the
``group_deleted`` envelope, delivery and side effect included (the loop stall it causes),
measured inside ``tornado-rt serve`` (started through a wrapper that times ``Router.dispatch``).

``batch``: --receivers connections subscribed to tables 1..--receivers (in a child process that
reads and checks everything it gets), a bystander subscribed to table 5000, and a thread that
publishes a marker to table 5000 every 5 ms and times its arrival at the bystander. Then one
``POST /api/publish`` of --envelopes envelopes (~9 MiB; ``row_orders_recalculated`` spread over
the receivers' tables). Reported: the batch request's time, the bystander's marker latency
(max and median) while the batch was in progress, and whether the receivers got every message
in order.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import jwt

SECRET = "stalls-bench-secret-0123456789abcdef-xyz"
API_KEY = "stalls-bench-api-key-0123456789"
MIB = 1024 * 1024


def token(user_id: int) -> str:
    return jwt.encode({"user_id": user_id, "exp": int(time.time()) + 3600, "token_type": "access"},
                      SECRET, algorithm="HS256")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ``tornado-rt serve`` with one measurement added: every envelope the router dispatches whose type
# is in TIMED is timed (the router runs the side effects synchronously with the in-memory
# directory, so this is the whole loop stall the envelope causes) and reported on stderr.
TIMED_SERVE = """
import sys, time
import tornado_rt.router as router
from tornado_rt.cli import main
original = router.Router.dispatch
def dispatch(self, envelope):
    if envelope.type not in ("group_deleted", "table_deleted"):
        return original(self, envelope)
    started = time.perf_counter()
    try:
        return original(self, envelope)
    finally:
        print("DISPATCH %s %.3f" % (envelope.type, (time.perf_counter() - started) * 1000), file=sys.stderr, flush=True)
router.Router.dispatch = dispatch
sys.exit(main(sys.argv[1:]))
"""


class Server:
    """``tornado-rt serve`` as a subprocess (the tornado_rt importable from "/", so PYTHONPATH
    chooses the version), with the dispatch of deletions timed inside the server."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORNADO_RT_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TIMED_SERVE, "serve", "--port", "0", "--jwt-secret", SECRET,
             "--api-key", API_KEY, "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/",
            preexec_fn=raise_fd_limit)
        self.timings: List[Tuple[str, float]] = []
        threading.Thread(target=self._read_stderr, daemon=True).start()
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"(ws://\S+)\s+http://[^:]+:(\d+)/", line)
        if not match:
            raise SystemExit(f"the server did not start: {line!r}")
        self.ws_url, self.port = match.group(1), int(match.group(2))
        where = subprocess.run([sys.executable, "-c", "import tornado_rt; print(tornado_rt.__file__)"],
                               env=env, cwd="/", capture_output=True, text=True).stdout.strip()
        print(f"server: {where}, pid {self.proc.pid}", flush=True)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            if line.startswith("DISPATCH "):
                _, kind, ms = line.split()
                self.timings.append((kind, float(ms)))

    def effect_ms(self, kind: str, wait: float = 5.0) -> float:
        """The next timed dispatch of ``kind`` (milliseconds inside the server)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for i, (k, ms) in enumerate(self.timings):
                if k == kind:
                    del self.timings[i]
                    return ms
            time.sleep(0.01)
        return float("nan")

    def http(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None, conn: Optional[http.client.HTTPConnection] = None,
             raw: Optional[bytes] = None) -> Tuple[int, Any, float]:
        """(status, parsed answer, seconds)."""
        own = conn is None
        conn = conn or self.http()
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        started = time.perf_counter()
        conn.request(method, path, data, {"Authorization": f"Bearer {API_KEY}",
                                          "Content-Type": "application/json"})
        answer = conn.getresponse()
        text = answer.read()
        elapsed = time.perf_counter() - started
        if own:
            conn.close()
        return answer.status, json.loads(text) if text else None, elapsed

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class HealthProbe(threading.Thread):
    """A bystander: GET /healthz in a loop over one kept-alive connection; records (start, latency)."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server = server
        self.samples: List[Tuple[float, float]] = []
        self.running = True

    def run(self) -> None:
        conn = self.server.http()
        while self.running:
            started = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            self.samples.append((started, time.perf_counter() - started))
            time.sleep(0.001)

    def worst(self, t0: float, t1: float) -> float:
        """The largest latency of a probe that was in flight at some point in [t0, t1]."""
        return max((lat for start, lat in self.samples if start <= t1 and start + lat >= t0), default=0.0)


async def open_clients(ws_url: str, users: List[Tuple[int, List[int]]], concurrency: int = 64) -> List[Any]:
    """WebSocket clients, each authenticated and subscribed to its tables."""
    from tornado.websocket import websocket_connect

    gate = asyncio.Semaphore(concurrency)
    clients: List[Any] = []

    async def one(user_id: int, tables: List[int]) -> None:
        async with gate:
            conn = await websocket_connect(f"{ws_url}?jwt_token={token(user_id)}", max_message_size=64 * MIB)
            auth = json.loads(await conn.read_message())
            assert auth["success"], auth
            for table in tables:
                conn.write_message(json.dumps({"page": "table", "table_id": table}))
            for _ in tables:
                added = json.loads(await conn.read_message())
                assert added["type"] == "page_add", added
            clients.append(conn)

    await asyncio.gather(*(one(u, t) for u, t in users))
    return clients


# --- drops ---------------------------------------------------------------------------------------------

def drops(args: argparse.Namespace) -> None:
    server = Server()
    try:
        n, rounds, per = args.connections, args.rounds, args.tables
        workspaces: Dict[str, List[int]] = {"1": list(range(1, n + 1))}
        tables: Dict[str, int] = {str(t): 1 for t in range(1, 2001)}
        for r in range(rounds):
            workspaces[str(2 + r)] = []
            for t in range(per):
                tables[str(100_000 + r * per + t)] = 2 + r
        status, answer, _ = server.call("PUT", "/api/directory", {"workspaces": workspaces, "tables": tables})
        assert status == 200, answer

        async def main() -> None:
            started = time.perf_counter()
            clients = await open_clients(server.ws_url, [(i + 1, [1 + i % 1000, 1001 + i % 1000]) for i in range(n)])
            print(f"{len(clients)} connections x 2 pages in {time.perf_counter() - started:.1f} s", flush=True)
            status, stats, _ = server.call("GET", "/api/stats")
            print(f"server: {stats['connections']} connections, {stats['subscriptions']} subscriptions", flush=True)
            probe = HealthProbe(server)
            probe.start()
            await asyncio.sleep(0.5)
            conn = server.http()
            loop = asyncio.get_running_loop()

            async def publish(message: Dict[str, Any]) -> Tuple[int, Any, float]:
                # in a thread: this loop keeps answering the server's pings meanwhile
                return await loop.run_in_executor(None, lambda: server.call("POST", "/api/publish",
                                                                            {"message": message}, conn))
            results = []
            for r in range(rounds):
                t0 = time.perf_counter()
                status, answer, took = await publish({"type": "group_deleted", "workspace_id": 2 + r})
                t1 = time.perf_counter()
                assert status == 200, answer
                await asyncio.sleep(0.05)
                effect = server.effect_ms("group_deleted")
                results.append((effect, took, probe.worst(t0, t1)))
                print(f"group_deleted of a {per}-table workspace nobody has open: in the server {effect:.2f} ms; "
                      f"request {took * 1000:.1f} ms, bystander's worst /healthz {probe.worst(t0, t1) * 1000:.1f} ms",
                      flush=True)
            status, stats, _ = server.call("GET", "/api/stats")
            print(f"server: {stats['connections']} connections, {stats['subscriptions']} subscriptions", flush=True)
            t0 = time.perf_counter()
            status, answer, took = await publish({"type": "group_deleted", "workspace_id": 1})
            t1 = time.perf_counter()
            await asyncio.sleep(0.05)
            print(f"group_deleted of workspace 1 ({n} connections x 2 pages dropped): in the server "
                  f"{server.effect_ms('group_deleted'):.2f} ms; request {took * 1000:.1f} ms, "
                  f"bystander's worst /healthz {probe.worst(t0, t1) * 1000:.1f} ms", flush=True)
            probe.running = False
            print(f"worst over the {rounds} unwatched rounds: in the server {max(e for e, _, _ in results):.2f} ms; "
                  f"request {max(t for _, t, _ in results) * 1000:.1f} ms, "
                  f"bystander {max(b for _, _, b in results) * 1000:.1f} ms", flush=True)
            for c in clients:
                c.close()

        asyncio.run(main())
    finally:
        server.stop()


# --- batch ---------------------------------------------------------------------------------------------

def batch_item(n: int, tables: int, pad: str) -> Dict[str, Any]:
    return {"message": {"type": "row_orders_recalculated", "table_id": 1 + n % tables, "n": n, "pad": pad}}


def receivers_main(ws_url: str, tables: int, expected: int, ready: Any, result: Any) -> None:
    """Child process: one connection per table 1..tables; checks every batch message arrives in order."""
    async def main() -> None:
        clients = await open_clients(ws_url, [(t, [t]) for t in range(1, tables + 1)])
        ready.set()
        got = 0
        in_order = True

        async def drain(conn: Any) -> None:
            nonlocal got, in_order
            last = -1
            while got < expected:
                msg = await conn.read_message()
                if msg is None:
                    return
                n = json.loads(msg)["n"]
                in_order = in_order and n > last
                last = n
                got += 1
        tasks = [asyncio.ensure_future(drain(c)) for c in clients]
        await asyncio.wait(tasks, timeout=120)
        result.put((got, in_order))
        for c in clients:
            c.close()
    asyncio.run(main())


def batch(args: argparse.Namespace) -> None:
    server = Server()
    try:
        receivers, count = args.receivers, args.envelopes
        status, answer, _ = server.call("PUT", "/api/directory", {
            "workspaces": {"1": list(range(1, receivers + 2))},
            "tables": {**{str(t): 1 for t in range(1, receivers + 1)}, "5000": 1}})
        assert status == 200, answer
        probe_item = json.dumps(batch_item(count - 1, receivers, ""))
        pad = "x" * max(0, (args.mib * MIB) // count - len(probe_item) - 2)
        body = json.dumps([batch_item(n, receivers, pad) for n in range(count)]).encode()
        print(f"batch: {count} envelopes, {len(body) / MIB:.2f} MiB, over {receivers} pages", flush=True)

        ctx = multiprocessing.get_context("spawn")
        ready, result = ctx.Event(), ctx.Queue()
        child = ctx.Process(target=receivers_main, args=(server.ws_url, receivers, count, ready, result))
        child.start()
        if not ready.wait(60):
            raise SystemExit("the receivers did not connect")

        async def main() -> None:
            (bystander,) = await open_clients(server.ws_url, [(receivers + 1, [5000])])
            sent: Dict[int, float] = {}
            latencies: List[Tuple[float, float]] = []  # (sent at, latency)
            running = True

            def markers() -> None:
                conn = server.http()
                i = 0
                while running:
                    sent[i] = time.perf_counter()
                    status, _, _ = server.call("POST", "/api/publish", {"message": {
                        "type": "row_orders_recalculated", "table_id": 5000, "marker": i}}, conn)
                    assert status == 200
                    i += 1
                    time.sleep(0.005)

            async def read() -> None:
                while True:
                    msg = await bystander.read_message()
                    if msg is None:
                        return
                    i = json.loads(msg)["marker"]
                    latencies.append((sent[i], time.perf_counter() - sent[i]))

            reader = asyncio.ensure_future(read())
            publisher = threading.Thread(target=markers, daemon=True)
            publisher.start()
            await asyncio.sleep(1.0)
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            status, answer, took = await loop.run_in_executor(
                None, lambda: server.call("POST", "/api/publish", raw=body))
            t1 = time.perf_counter()
            assert status == 200, answer
            await asyncio.sleep(0.5)
            running = False
            publisher.join()
            await asyncio.sleep(0.1)
            reader.cancel()
            during = sorted(lat for at, lat in latencies if at <= t1 and at + lat >= t0)
            before = sorted(lat for at, lat in latencies if at + lat < t0)
            print(f"batch request: {took * 1000:.0f} ms, answer {answer}", flush=True)
            if during:
                print(f"bystander's marker latency during the batch: max {during[-1] * 1000:.1f} ms, "
                      f"median {during[len(during) // 2] * 1000:.1f} ms ({len(during)} markers)", flush=True)
            if before:
                print(f"before the batch: max {before[-1] * 1000:.1f} ms, median {before[len(before) // 2] * 1000:.1f} ms "
                      f"({len(before)} markers)", flush=True)
            bystander.close()

        asyncio.run(main())
        got, in_order = result.get(timeout=120)
        print(f"receivers: {got} of {count} messages, {'in order' if in_order else 'OUT OF ORDER'}", flush=True)
        child.join(10)
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="case", required=True)
    d = sub.add_parser("drops", help="permission-group drops (issue 10, item 6)")
    d.add_argument("--connections", type=int, default=3000)
    d.add_argument("--tables", type=int, default=500, help="tables per deleted workspace")
    d.add_argument("--rounds", type=int, default=5, help="unwatched workspaces deleted one after the other")
    b = sub.add_parser("batch", help="one maximal batch (issue 10, item 9)")
    b.add_argument("--envelopes", type=int, default=100_000)
    b.add_argument("--mib", type=int, default=9, help="size of the batch body")
    b.add_argument("--receivers", type=int, default=100, help="connections (one page each) the batch goes to")
    args = parser.parse_args()
    raise_fd_limit()
    drops(args) if args.case == "drops" else batch(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
