"""Many pages over several ``tornado-rt serve --broker redis://`` processes: what each process and
Redis pay per cluster publish (issue 16 item 5, the measurement behind docs/scaling.md).

    python bench/redis_scale.py                                   # quick default, < 60 s at P=4
    python bench/redis_scale.py --processes 8 --idle-processes 2 --pages 10000 --messages 50000
    PYTHONPATH=/path/to/other/checkout python bench/redis_scale.py --out bench/results/other
    python bench/redis_scale.py --processes 8 --idle-processes 2 --shards 3    # 3 Redis instances
    python bench/redis_scale.py --summarize bench/results/*.json --project-shards 1,3,4

What runs: its own ``redis-server`` (loopback, a free port, no persistence) — ``--shards`` K of
them, the page groups partitioned over them —, ``--processes`` P
``python -m tornado_rt serve --broker redis://...`` processes (each given all K URLs in one order:
``--broker url1,...,urlK``; started with the working directory
in a temporary directory, so **PYTHONPATH selects which checkout of tornado_rt is measured**; the
JSON records the file that was imported), the directory (workspace 1 with one user per viewer;
tables 1..2N) loaded through ``PUT /api/directory`` of every process in turn (each answer comes
after that process applied it and everything before it), ``--viewers`` V WebSocket connections
per page for ``--pages`` N pages (bench/wsclient.py's client processes; connection k is user k
and subscribes to the ``table`` page of its table), each on a random process among the first
P - ``--idle-processes``; the last ``--idle-processes`` processes get no connection and no publish.

Two measured phases, each preceded by a fully delivered warm-up round and a wait until no process
uses CPU any more:

``watched``
    ``--messages`` M ``rows_updated`` messages of ~570 bytes (bench/run.py's ``http-pages``
    payload), spread uniformly: round r sends one message to each page 1..N (M // N rounds), in
    ``POST /api/publish`` batches of ``--batch`` (100) assigned round-robin to the active
    processes, one keep-alive connection per active process, all active processes at once; never
    more than ``--window`` rounds ahead of the slowest connection. ``--publisher redis`` sends
    the same batches with ``RedisPublisher.publish_many`` from this process instead (then the
    servers only read). Every message must reach every viewer of its page: the load client
    counts each connection's messages and checks their sequence; what is missing is ``lost``.
``unwatched``
    ``--unwatched-messages`` messages to tables N+1..2N, which nobody watches, the same way.

Per process: on-CPU time from ``/proc/<pid>/task/*/schedstat`` (as bench/run.py), the
publishes it accepted, the deliveries it made and the envelopes it had no recipient for, and CPU
µs per cluster publish. Redis: CPU µs per cluster publish (its /proc) and, per command, calls
and µs from ``INFO commandstats``; with K instances for each instance (per *cluster* publish, so
they add up: ``redis_instances``) and for all of them together (the ``redis_*`` figures). Derived, the model's per-envelope costs (docs/scaling.md):

* ``c_read``: CPU of an idle process (no subscriber, no publish) per cluster publish: what every
  process pays for an envelope it has no recipient for (issue target: at most 1 µs);
* ``c_pub``: an active process's CPU per publish it accepted, from the unwatched phase (its
  CPU minus ``c_read`` for the envelopes of the other active processes, over its publishes);
* ``c_del``: an active process's CPU per local delivery in the watched phase, beyond ``c_pub``
  for its publishes and ``c_read`` for every other envelope;
* ``r_pub``: Redis CPU per cluster publish.

Writes ``--out`` PREFIX.json (every figure) and PREFIX.md (the tables); exit code 1 when a
message was lost, a connection failed or the cluster did not drain.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as bench  # noqa: E402  (also puts bench/servers on sys.path)
import common  # noqa: E402

DEFAULTS = dict(processes=4, idle_processes=1, pages=2000, viewers=1, messages=20000, unwatched_messages=10000,
                batch=100, window=2, publisher="http", workers=2, seed=1, drain_timeout=60.0, settle=5.0, shards=1)


# --- the cluster ------------------------------------------------------------------------------------
class ServeProcess:
    """One ``python -m tornado_rt serve --broker URL`` (the checkout PYTHONPATH selects)."""

    def __init__(self, index: int, redis_url: str, log_dir: str, lifetime: float):
        self.index = index
        self.port = bench.free_port()
        self.log_path = os.path.join(log_dir, f"redis-scale-{index}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tornado_rt", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--jwt-secret", common.SECRET, "--api-key", common.API_KEY, "--broker", redis_url,
             "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tempfile.gettempdir(),
            start_new_session=True, preexec_fn=bench._die_with_parent)
        bench._children.append(self)
        self.pid = self.proc.pid
        self.deadline = time.monotonic() + lifetime

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"process {self.index} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if http_call(self.port, "GET", "/healthz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"process {self.index} not ready within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.05)

    def cpu(self) -> float:
        return bench.proc_cpu_ns(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        bench._terminate(self.proc)
        self.log.close()
        if self in bench._children:
            bench._children.remove(self)


class Cluster:
    """K Redis instances + P processes, each given all K URLs in the same order (``--broker
    url1,...,urlK``: page groups partitioned over them; one URL when K = 1). ``redis`` is
    instance 0, ``redises`` all of them."""

    def __init__(self, processes: int, lifetime: float, shards: int = 1):
        os.makedirs(os.path.join(bench.RESULTS_DIR, "logs"), exist_ok=True)
        self.redises: List[Any] = []
        self.procs: List[ServeProcess] = []
        try:
            for k in range(shards):
                self.redises.append(bench.RedisServer("redis-scale-redis" + (f"-{k}" if shards > 1 else "")))
            self.redis = self.redises[0]
            self.url = ",".join(r.url for r in self.redises)
            for i in range(processes):
                self.procs.append(ServeProcess(i, self.url, os.path.join(bench.RESULTS_DIR, "logs"), lifetime))
            for p in self.procs:
                p.wait_ready()
        except BaseException:
            self.stop()
            raise

    def settle_view(self) -> Any:
        """What bench.run.settle_cpu reads: every process and every Redis instance."""
        return types.SimpleNamespace(procs=list(self.procs) + self.redises[1:], redis=self.redises[0])

    def alive(self) -> bool:
        return all(r.alive() for r in self.redises) and all(p.alive() for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        for r in self.redises:
            r.stop()


def http_call(port: int, method: str, path: str, body: Optional[bytes] = None, timeout: float = 30.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {common.API_KEY}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body, headers)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


# --- Redis's own numbers -------------------------------------------------------------------------------
def redis_info(port: int, section: str) -> str:
    """``INFO <section>`` over a raw socket (RESP bulk string)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"INFO {section}\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            data += s.recv(65536)
        head, rest = data.split(b"\r\n", 1)
        n = int(head[1:])
        while len(rest) < n:
            rest += s.recv(65536)
        return rest[:n].decode()


def redis_command(port: int, *args: str) -> Any:
    """One command over a raw socket; returns an int, a str, None or a list of those (RESP2)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args))
        f = s.makefile("rb")

        def read() -> Any:
            line = f.readline()[:-2]
            kind, rest = line[:1], line[1:]
            if kind in (b"+", b"-"):
                return rest.decode()
            if kind == b":":
                return int(rest)
            if kind == b"$":
                return None if int(rest) < 0 else f.read(int(rest) + 2)[:-2].decode()
            if kind == b"*":
                return None if int(rest) < 0 else [read() for _ in range(int(rest))]
            raise RuntimeError(f"unexpected reply {line!r}")
        return read()


def wait_for_routing(port: int, prefix: str, timeout: float = 120.0) -> Optional[int]:
    """A broker that routes page messages per group (``<prefix>:routing`` holds the Redis time in
    ms from which it does) routes nothing before that time: wait for it, so the measured phases
    see the design in its steady state. None when the key does not exist (one stream for all)."""
    deadline = time.monotonic() + timeout
    while True:
        since = redis_command(port, "GET", f"{prefix}:routing")
        if since is None:
            return None
        sec, usec = redis_command(port, "TIME")
        if int(sec) * 1000 + int(usec) // 1000 >= int(since):
            return int(since)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{prefix}:routing still in the future after {timeout:.0f} s")
        time.sleep(0.1)


def commandstats(port: int) -> Dict[str, Dict[str, float]]:
    """{command: {"calls": n, "usec": µs}} from ``INFO commandstats``."""
    out: Dict[str, Dict[str, float]] = {}
    for line in redis_info(port, "commandstats").splitlines():
        if not line.startswith("cmdstat_"):
            continue
        name, fields = line[8:].split(":", 1)
        kv = dict(f.split("=", 1) for f in fields.split(","))
        out[name] = {"calls": float(kv["calls"]), "usec": float(kv["usec"])}
    return out


def stats_sum(parts: Sequence[Dict[str, Dict[str, float]]]) -> Dict[str, Dict[str, float]]:
    """The commandstats of several instances added up, per command."""
    out: Dict[str, Dict[str, float]] = {}
    for part in parts:
        for name, v in part.items():
            acc = out.setdefault(name, {"calls": 0.0, "usec": 0.0})
            acc["calls"] += v["calls"]
            acc["usec"] += v["usec"]
    return out


def stats_delta(a: Dict[str, Dict[str, float]], b: Dict[str, Dict[str, float]], publishes: int) -> Dict[str, Any]:
    out = {}
    for name, v in b.items():
        calls = v["calls"] - a.get(name, {}).get("calls", 0.0)
        usec = v["usec"] - a.get(name, {}).get("usec", 0.0)
        if calls:
            out[name] = {"calls": int(calls), "usec": usec,
                         "usec_per_publish": usec / publishes if publishes else None,
                         "calls_per_publish": calls / publishes if publishes else None}
    return out


# --- publishing -------------------------------------------------------------------------------------
class HttpPublisher:
    """One keep-alive connection per active process; the batches of a round are dealt round-robin
    over them (continuing across rounds) and the processes publish in parallel."""

    def __init__(self, ports: Sequence[int]):
        self.clients = [bench.HttpClient(p) for p in ports]
        self.turn = 0

    async def open(self) -> "HttpPublisher":
        for c in self.clients:
            await c.open()
        return self

    def deal(self, tables: Sequence[int], batch: int) -> List[List[List[int]]]:
        shares: List[List[List[int]]] = [[] for _ in self.clients]
        for i in range(0, len(tables), batch):
            shares[self.turn % len(self.clients)].append(list(tables[i:i + batch]))
            self.turn += 1
        return shares

    async def round(self, tables: Sequence[int], batch: int, seq: int) -> List[int]:
        ts = time.time_ns() // 1000
        shares = self.deal(tables, batch)

        async def send(client, chunks) -> None:
            for chunk in chunks:
                await client.publish(bench.batch_body(chunk, seq, ts))
        await asyncio.gather(*(send(c, s) for c, s in zip(self.clients, shares)))
        return [sum(len(c) for c in s) for s in shares]

    def close(self) -> None:
        for c in self.clients:
            c.close()


class RedisPublisherSender:
    """``--publisher redis``: tornado_rt.redis_broker.RedisPublisher in this process (the same
    checkout, through PYTHONPATH); no server process accepts a publish."""

    def __init__(self, url: str, n_procs: int):
        from tornado_rt.redis_broker import RedisPublisher
        self.pub = RedisPublisher(url)
        self.n = n_procs

    async def open(self) -> "RedisPublisherSender":
        return self

    async def round(self, tables: Sequence[int], batch: int, seq: int) -> List[int]:
        ts = time.time_ns() // 1000
        for i in range(0, len(tables), batch):
            self.pub.publish_many([{"message": common.rows_updated_large(t, seq, ts)} for t in tables[i:i + batch]])
        return [0] * self.n

    def close(self) -> None:
        close = getattr(self.pub, "close", None)
        if close:
            close()


# --- one phase ----------------------------------------------------------------------------------------
async def phase(cluster: Cluster, pool: Optional[bench.ClientPool], sender, tables: Sequence[int], rounds: int,
                cfg: dict, active: int) -> Dict[str, Any]:
    """Round 0 (warm-up, fully delivered when ``pool``), settle, rounds 1..rounds measured, drain,
    settle. Returns CPU per process and of Redis, what each process accepted, and delivery."""
    await sender.round(tables, cfg["batch"], 0)
    if pool is not None and not await bench.wait_drained(pool, 1, max(cfg["drain_timeout"], 120.0), cfg["settle"]):
        raise RuntimeError("warm-up round not fully delivered")
    await bench.settle_cpu(cluster.settle_view())
    accepted = [0] * len(cluster.procs)
    cs0 = [commandstats(r.port) for r in cluster.redises]
    cpu0 = [p.cpu() for p in cluster.procs]
    rcpu0 = [r.cpu() for r in cluster.redises]
    (mb0, ma0), pcpu0, t0 = bench.machine_cpu(), bench.self_cpu(), time.monotonic()
    for seq in range(1, rounds + 1):
        while pool is not None and seq - pool.minimum() >= cfg["window"]:
            await asyncio.sleep(0.001)
        for i, n in enumerate(await sender.round(tables, cfg["batch"], seq)):
            accepted[i] += n
    drained = True
    if pool is not None:
        drained = await bench.wait_drained(pool, rounds + 1, cfg["drain_timeout"], cfg["settle"])
    t1 = time.monotonic()
    await bench.settle_cpu(cluster.settle_view())  # the other processes and Redis may still be reading
    cpu1 = [p.cpu() for p in cluster.procs]
    rcpu1 = [r.cpu() for r in cluster.redises]
    (mb1, ma1), pcpu1 = bench.machine_cpu(), bench.self_cpu()
    cs1 = [commandstats(r.port) for r in cluster.redises]
    publishes = rounds * len(tables)
    rcpu = sum(rcpu1) - sum(rcpu0)
    # Per instance: its CPU and commands per *cluster* publish (so the instances' figures add up
    # to the all-instance ones); "redis_*" without "instances" are all instances together.
    instances = [{"cpu_s": b - a, "cpu_us_per_publish": (b - a) / publishes * 1e6,
                  "commands": stats_delta(x, y, publishes)}
                 for a, b, x, y in zip(rcpu0, rcpu1, cs0, cs1)]
    return {"rounds": rounds, "publishes": publishes, "wall_s": t1 - t0, "drained": drained,
            "publishes_per_s": publishes / (t1 - t0) if t1 > t0 else None,
            "cpu_s": [b - a for a, b in zip(cpu0, cpu1)], "accepted": accepted,
            "redis_cpu_s": rcpu,
            "redis_cpu_us_per_publish": rcpu / publishes * 1e6,
            "redis_commands": stats_delta(stats_sum(cs0), stats_sum(cs1), publishes),
            "redis_instances": instances,
            "harness_cpu_s": pcpu1 - pcpu0,
            "machine_busy_cores": (mb1 - mb0) / (ma1 - ma0) * (os.cpu_count() or 1) if ma1 > ma0 else None}


def per_process(ph: Dict[str, Any], local: Sequence[Dict[int, int]], tables: Sequence[int],
                idle: Sequence[bool], watched: bool) -> List[Dict[str, Any]]:
    """Per process: what it accepted, delivered, had no recipient for, and its CPU per unit."""
    M, rounds = ph["publishes"], ph["rounds"]
    rows = []
    for i, cpu in enumerate(ph["cpu_s"]):
        pages_here = sum(1 for t in tables if local[i].get(t)) if watched else 0
        deliveries = sum(local[i].get(t, 0) for t in tables) * rounds if watched else 0
        rows.append({"process": i, "idle": idle[i], "cpu_s": cpu, "accepted": ph["accepted"][i],
                     "deliveries": deliveries,
                     "envelopes_with_local_recipient": pages_here * rounds,
                     "envelopes_without_local_recipient": M - pages_here * rounds,
                     "cpu_us_per_cluster_publish": cpu / M * 1e6,
                     "cpu_us_per_accepted": cpu / ph["accepted"][i] * 1e6 if ph["accepted"][i] else None,
                     "cpu_us_per_delivery": cpu / deliveries * 1e6 if deliveries else None,
                     "cpu_util": cpu / ph["wall_s"] if ph["wall_s"] else None})
    return rows


def mean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def derive(watched: Dict[str, Any], unwatched: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The model's per-envelope costs (see the module docstring)."""
    out: Dict[str, Any] = {"r_pub_us": watched["redis_cpu_us_per_publish"]}
    idle_w = [r["cpu_us_per_cluster_publish"] for r in watched["per_process"] if r["idle"]]
    out["c_read_us"] = mean(idle_w)
    out["c_read_us_by_idle_process"] = idle_w
    c_read_u = None
    if unwatched is not None:
        out["r_pub_unwatched_us"] = unwatched["redis_cpu_us_per_publish"]
        idle_u = [r["cpu_us_per_cluster_publish"] for r in unwatched["per_process"] if r["idle"]]
        c_read_u = mean(idle_u)
        out["c_read_unwatched_us"] = c_read_u
        M = unwatched["publishes"]
        pubs = []
        for r in unwatched["per_process"]:
            if r["accepted"]:
                others = M - r["accepted"]
                if others and c_read_u is None:
                    continue
                pubs.append((r["cpu_s"] * 1e6 - others * (c_read_u or 0.0)) / r["accepted"])
        out["c_pub_us"] = mean(pubs)
        out["c_pub_us_by_process"] = pubs
    c_pub, c_read = out.get("c_pub_us"), out["c_read_us"]
    M = watched["publishes"]
    dels = []
    for r in watched["per_process"]:
        if not r["deliveries"]:
            continue
        others = M - r["accepted"]
        if (r["accepted"] and c_pub is None) or (others and c_read is None):
            continue
        dels.append((r["cpu_s"] * 1e6 - r["accepted"] * (c_pub or 0.0) - others * (c_read or 0.0)) / r["deliveries"])
    out["c_del_us"] = mean(dels)
    out["c_del_us_by_process"] = dels
    return out


# --- the run ------------------------------------------------------------------------------------------
def checkout_info() -> Dict[str, Any]:
    """Which tornado_rt the servers import (same interpreter, PYTHONPATH, working directory)."""
    code = "import tornado_rt, os; print(os.path.dirname(os.path.abspath(tornado_rt.__file__)))"
    path = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tempfile.gettempdir()).stdout.strip()
    info: Dict[str, Any] = {"tornado_rt": path, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    git = subprocess.run(["git", "-C", os.path.dirname(path), "log", "-1", "--format=%h %s"],
                         capture_output=True, text=True)
    branch = subprocess.run(["git", "-C", os.path.dirname(path), "rev-parse", "--abbrev-ref", "HEAD"],
                            capture_output=True, text=True)
    if git.returncode == 0:
        info["commit"] = git.stdout.strip()
        info["branch"] = branch.stdout.strip()
        dirty = subprocess.run(["git", "-C", os.path.dirname(path), "status", "--porcelain", "--", "tornado_rt"],
                               capture_output=True, text=True).stdout.strip()
        info["uncommitted_changes"] = dirty.splitlines()  # measured as in the working tree
    return info


def measure(cfg: dict) -> Dict[str, Any]:
    P, K, N, V = cfg["processes"], cfg["idle_processes"], cfg["pages"], cfg["viewers"]
    active = P - K
    rng = random.Random(cfg["seed"])
    # local[i][table] = viewers of that table on process i
    local: List[Dict[int, int]] = [dict() for _ in range(P)]
    placement = []
    for t in range(1, N + 1):
        for _ in range(V):
            i = rng.randrange(active)
            local[i][t] = local[i].get(t, 0) + 1
            placement.append((t, i))
    rng.shuffle(placement)  # connections of one page do not go to one client worker in a row
    lifetime = cfg["lifetime"]
    result: Dict[str, Any] = {"config": cfg, "checkout": checkout_info(),
                              "loadavg_at_start": os.getloadavg()}
    cluster = Cluster(P, lifetime, cfg.get("shards", 1))
    pool = None
    try:
        result["redis_server"] = cluster.redis.version
        users = list(range(1, N * V + 1))
        body = json.dumps({"workspaces": {"1": users}, "tables": {str(t): 1 for t in range(1, 2 * N + 1)}}).encode()
        for p in cluster.procs:  # every answer comes after that process applied it (and all before)
            status, text = http_call(p.port, "PUT", "/api/directory", body, timeout=60)
            if status != 200:
                raise RuntimeError(f"PUT /api/directory on process {p.index}: {status} {text[:300]!r}")
        since = [wait_for_routing(r.port, "tornado-rt") for r in cluster.redises]
        result["routing_since_ms"] = since[0]
        result["routing_since_ms_by_instance"] = since
        pool = bench.ClientPool(cfg["workers"], [cluster.procs[0].port], lifetime=lifetime)
        # (user, tables, port): bench/wsclient.py's workers take the port from a spec's third item
        specs: List[Any] = [(k + 1, (t,), cluster.procs[i].port) for k, (t, i) in enumerate(placement)]
        t0 = time.monotonic()
        conn = pool.connect(specs, concurrency=128)
        result["connect"] = {"ok": conn["ok"], "failed": conn["failed"], "errors": conn["errors"],
                             "seconds": time.monotonic() - t0}
        if conn["failed"]:
            raise RuntimeError(f"{conn['failed']} connections failed: {conn['errors']}")
        idle = [i >= active for i in range(P)]

        async def drive():
            sender: Any
            if cfg["publisher"] == "redis":
                sender = await RedisPublisherSender(cluster.url, P).open()
            else:
                sender = await HttpPublisher([p.port for p in cluster.procs[:active]]).open()
            try:
                w = await phase(cluster, pool, sender, list(range(1, N + 1)), max(1, cfg["messages"] // N), cfg, active)
                u = None
                if cfg["unwatched_messages"]:
                    u = await phase(cluster, None, sender, list(range(N + 1, 2 * N + 1)),
                                    max(1, cfg["unwatched_messages"] // N), cfg, active)
            finally:
                sender.close()
            return w, u
        watched, unwatched = asyncio.run(drive())
        if cfg["publisher"] == "http":
            for ph in (watched, unwatched):
                if ph is not None:
                    ph["accepted"] = ph["accepted"] + [0] * K
        report = pool.report(watched["rounds"] + 1)
        report.pop("latency_us", None)
        watched["delivery"] = report
        watched["per_process"] = per_process(watched, local, list(range(1, N + 1)), idle, True)
        if unwatched is not None:
            unwatched["per_process"] = per_process(unwatched, local, list(range(N + 1, 2 * N + 1)), idle, False)
        result["watched"], result["unwatched"] = watched, unwatched
        result["model"] = derive(watched, unwatched)
        stats = []
        for p in cluster.procs:
            status, text = http_call(p.port, "GET", "/api/stats")
            stats.append(json.loads(text) if status == 200 else {"status": status})
        result["api_stats"] = stats
        result["lost"] = report["lost"]
        result["order_errors"] = report["order_errors"]
        result["cluster_alive"] = cluster.alive()
    finally:
        if pool is not None:
            pool.stop()
        cluster.stop()
    result["loadavg_at_end"] = os.getloadavg()
    return result


def fmt(v: Any, spec: str = "{:.1f}") -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)):
        return spec.format(v)
    return str(v)


def markdown(r: Dict[str, Any]) -> str:
    cfg, w, u, m = r["config"], r["watched"], r.get("unwatched"), r["model"]
    lines = [f"# redis_scale: P={cfg['processes']} ({cfg['idle_processes']} idle), K={shards(r)} Redis instance(s), {cfg['pages']:,} pages x "
             f"{cfg['viewers']} viewer(s), {w['publishes']:,} messages via {cfg['publisher']}, batch {cfg['batch']}",
             "",
             f"checkout: `{r['checkout'].get('tornado_rt')}` ({r['checkout'].get('branch', '?')}: "
             f"{r['checkout'].get('commit', '?')}{', with uncommitted changes' if r['checkout'].get('uncommitted_changes') else ''}); {r['redis_server']}; load {r['loadavg_at_start'][0]:.2f} at start, "
             f"{r['loadavg_at_end'][0]:.2f} at end",
             "",
             f"delivered {w['delivery']['received']:,} (warm-up round included), **lost {r['lost']:,}**, order errors {r['order_errors']}, "
             f"{w['publishes_per_s']:,.0f} publishes/s, machine busy {fmt(w['machine_busy_cores'], '{:.2f}')} cores",
             "",
             "| process | phase | accepted | deliveries | envelopes w/o local recipient | CPU s | µs / cluster publish | µs / accepted | µs / delivery |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, ph in (("watched", w), ("unwatched", u)):
        if ph is None:
            continue
        for row in ph["per_process"]:
            label = f"{row['process']}{' (idle)' if row['idle'] else ''}"
            lines.append(f"| {label} | {name} | {row['accepted']:,} | {row['deliveries']:,} | "
                         f"{row['envelopes_without_local_recipient']:,} | {row['cpu_s']:.3f} | "
                         f"{fmt(row['cpu_us_per_cluster_publish'])} | {fmt(row['cpu_us_per_accepted'])} | "
                         f"{fmt(row['cpu_us_per_delivery'])} |")
        insts = ph.get("redis_instances") or []
        for k, inst in enumerate(insts if len(insts) > 1 else []):
            lines.append(f"| redis-server {k} | {name} | | | | {inst['cpu_s']:.3f} | {fmt(inst['cpu_us_per_publish'], '{:.2f}')} | | |")
        lines.append(f"| redis-server{' (all instances)' if shards(r) > 1 else ''} | {name} | | | | {ph['redis_cpu_s']:.3f} | "
                     f"{fmt(ph['redis_cpu_us_per_publish'])} | | |")
    lines += ["", "Redis commands (watched phase), per cluster publish (a script's time includes the commands it "
              "calls, which are listed too)" + (", all instances and each" if shards(r) > 1 else "") + ":", ""]
    insts = w.get("redis_instances") or []
    many = len(insts) > 1
    lines += ["| command | calls / publish | µs / publish |" + "".join(f" instance {k}: µs / publish |" for k in range(len(insts)) if many),
              "|---|---|---|" + "---|" * (len(insts) if many else 0)]
    for name, c in sorted(w["redis_commands"].items(), key=lambda kv: -kv[1]["usec"]):
        each = "".join(f" {fmt(i['commands'].get(name, {}).get('usec_per_publish'), '{:.2f}')} |" for i in insts) if many else ""
        lines.append(f"| {name} | {fmt(c['calls_per_publish'], '{:.3f}')} | {fmt(c['usec_per_publish'], '{:.2f}')} |" + each)
    lines += ["", "Model costs (docs/scaling.md):", "",
              "| symbol | meaning | µs |", "|---|---|---|",
              f"| c_read | CPU of an idle process per cluster publish (target <= 1) | {fmt(m.get('c_read_us'), '{:.2f}')} |",
              f"| c_pub | CPU per publish accepted (HTTP, own read-back included) | {fmt(m.get('c_pub_us'))} |",
              f"| c_del | CPU per local delivery beyond c_read | {fmt(m.get('c_del_us'))} |",
              f"| r_pub | Redis CPU per cluster publish (watched phase, {cfg['processes']} readers, all instances) | {fmt(m.get('r_pub_us'))} |",
              ""]
    return "\n".join(lines)


# --- the model, from several runs (--summarize) ----------------------------------------------------------
def _cmd(run: Dict[str, Any], name: str) -> float:
    return run["watched"]["redis_commands"].get(name, {}).get("usec_per_publish") or 0.0


def shards(run: Dict[str, Any]) -> int:
    """K, the Redis instances the page groups were partitioned over (1 for runs before --shards)."""
    return int(run["config"].get("shards", 1))


def routed(run: Dict[str, Any]) -> bool:
    """Did the broker route page messages per group (the ``<prefix>:routing`` key was set)?"""
    return run.get("routing_since_ms") is not None


def _split(r: Dict[str, Any], M: int) -> Tuple[float, float, float]:
    """(own deliveries, deliveries of other processes' publishes, envelopes read without local
    recipient) of an active process: its viewers' pages are published by it in the proportion
    A / M (viewers are placed independently of how batches are dealt)."""
    share = r["accepted"] / M
    others = r["envelopes_with_local_recipient"] * (1 - share)
    return r["deliveries"] * share, r["deliveries"] * (1 - share), M - r["accepted"] - others


def redis_x(run: Dict[str, Any]) -> int:
    """What Redis's cost per publish grows with: the processes reading every envelope (one
    stream), or the inboxes a publish batch reaches, i.e. the processes with viewers (routing)."""
    P = run["config"]["processes"]
    return P - run["config"]["idle_processes"] if routed(run) else P


def parameters(runs: Sequence[Dict[str, Any]], calib_max_p: int) -> Dict[str, Any]:
    """The model's costs (µs): c_read (idle processes), c_pub (unwatched phase) from every run;
    c_del from runs with one active process (every delivery is of its own publish); c_in (reading
    and delivering another process's envelope) from the runs with 2..``calib_max_p`` processes and
    several active ones; Redis per publish = r0 + r1 x fitted on the runs with P <= calib_max_p,
    x = :func:`redis_x` (every process has viewers in the projection: x = P)."""
    c_read = mean([r["model"].get("c_read_us") for r in runs])
    c_pub = mean([r["model"].get("c_pub_us") for r in runs])
    dels, ins = [], []
    for run in runs:
        w = run["watched"]
        M = w["publishes"]
        act = [x for x in w["per_process"] if not x["idle"]]
        for x in act:
            own, other, irrelevant = _split(x, M)
            rest = x["cpu_s"] * 1e6 - x["accepted"] * (c_pub or 0.0) - irrelevant * (c_read or 0.0)
            if len(act) == 1 and own:
                dels.append(rest / own)
    c_del = mean(dels)
    for run in runs:
        w = run["watched"]
        M = w["publishes"]
        act = [x for x in w["per_process"] if not x["idle"]]
        if len(act) < 2 or run["config"]["processes"] > calib_max_p:
            continue
        for x in act:
            own, other, irrelevant = _split(x, M)
            if other:
                ins.append((x["cpu_s"] * 1e6 - x["accepted"] * (c_pub or 0.0) - irrelevant * (c_read or 0.0)
                            - own * (c_del or 0.0)) / other)
    pts = [(redis_x(r), r["watched"]["redis_cpu_us_per_publish"]) for r in runs
           if r["config"]["processes"] <= calib_max_p] or [(redis_x(r), r["watched"]["redis_cpu_us_per_publish"])
                                                            for r in runs]
    n = len(pts)
    mx, my = sum(p for p, _ in pts) / n, sum(v for _, v in pts) / n
    var = sum((p - mx) ** 2 for p, _ in pts)
    r1 = sum((p - mx) * (v - my) for p, v in pts) / var if var else 0.0
    return {"c_read": c_read, "c_pub": c_pub, "c_del": c_del, "c_in": mean(ins), "r0": my - r1 * mx, "r1": r1,
            "xread_per_reader": mean([_cmd(r, "xread") / r["config"]["processes"] for r in runs]),
            "idle_util": mean([x["cpu_util"] for r in runs for x in r["watched"]["per_process"] if x["idle"]]),
            "runs": len(runs), "per_group": any(routed(r) for r in runs)}


def process_cpu(prm: Dict[str, Any], A: float, own: float, other: float, irrelevant: float) -> float:
    return (A * (prm["c_pub"] or 0.0) + own * (prm["c_del"] or 0.0) + other * (prm["c_in"] or 0.0)
            + irrelevant * (prm["c_read"] or 0.0))


def predict(run: Dict[str, Any], prm: Dict[str, Any]) -> Dict[str, Any]:
    """Predicted vs measured CPU per cluster publish of this run's idle and active processes and Redis."""
    w = run["watched"]
    M, P = w["publishes"], run["config"]["processes"]
    act = [r for r in w["per_process"] if not r["idle"]]
    idle = [r for r in w["per_process"] if r["idle"]]
    pred_act = mean([process_cpu(prm, r["accepted"], *_split(r, M)) / M for r in act])
    return {"idle_measured": mean([r["cpu_us_per_cluster_publish"] for r in idle]),
            "idle_predicted": prm["c_read"] if idle else None,
            "active_measured": mean([r["cpu_us_per_cluster_publish"] for r in act]), "active_predicted": pred_act,
            "redis_measured": w["redis_cpu_us_per_publish"], "redis_predicted": prm["r0"] + prm["r1"] * redis_x(run)}


def project(prm: Dict[str, Any], P: int, M: float, V: int) -> Tuple[float, float, float]:
    """(per process: % of a core on envelopes without local recipient, % of a core in all; Redis %
    of a core) for P processes, M publishes/s spread evenly over them, V viewers per page on random
    processes. With one stream a process reads every envelope; with per-group routing only those
    with a local viewer, and what an idle process spends is its background work (timers, the
    control stream), a constant share of a core rather than a cost per envelope."""
    f = 1 - (1 - 1 / P) ** V  # pages with a local viewer
    A = M / P
    D = M * V / P
    if prm["per_group"]:
        waste = (prm["idle_util"] or 0.0) * 1e6
        total = process_cpu(prm, A, D / P, D * (1 - 1 / P), 0.0) + waste
    else:
        waste = (M - A) * (1 - f) * (prm["c_read"] or 0.0)
        total = process_cpu(prm, A, D / P, D * (1 - 1 / P), (M - A) * (1 - f))
    return waste / 1e4, total / 1e4, M * (prm["r0"] + prm["r1"] * P) / 1e4


def instance_costs(run: Dict[str, Any]) -> List[float]:
    """Redis CPU µs per cluster publish of each instance (watched phase); one entry for a run
    before --shards (its only instance)."""
    w = run["watched"]
    insts = w.get("redis_instances")
    if not insts:
        return [w["redis_cpu_us_per_publish"]]
    return [i["cpu_us_per_publish"] for i in insts]


def _line(pts: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """Least-squares (intercept, slope) through (x, y) points (slope 0 when x does not vary)."""
    n = len(pts)
    mx, my = sum(p for p, _ in pts) / n, sum(v for _, v in pts) / n
    var = sum((p - mx) ** 2 for p, _ in pts)
    slope = sum((p - mx) * (v - my) for p, v in pts) / var if var else 0.0
    return my - slope * mx, slope


def shard_model(runs: Sequence[Dict[str, Any]], calib_max_p: int) -> Dict[str, Any]:
    """Redis CPU per cluster publish, all instances together, as a function of x (:func:`redis_x`)
    and K: for each K measured a line r0_K + r1_K x (runs with P <= ``calib_max_p``, or all when
    none); with two or more K measured, r0 and r1 are in turn linear in K (each more instance adds
    one script call per publish batch and one reader per process on it), so other K are
    interpolated or extrapolated; with one K measured, the all-instance cost is taken as the same
    for every K (flagged by ``k_measured``). Per instance: that divided by K (page groups spread
    evenly: ``imbalance`` is the measured busiest instance over the mean)."""
    lines: Dict[int, Tuple[float, float]] = {}
    for K in sorted({shards(r) for r in runs}):
        mine = [r for r in runs if shards(r) == K]
        pts = [(redis_x(r), r["watched"]["redis_cpu_us_per_publish"]) for r in mine
               if r["config"]["processes"] <= calib_max_p] or [
               (redis_x(r), r["watched"]["redis_cpu_us_per_publish"]) for r in mine]
        lines[K] = _line(pts)
    if len(lines) > 1:
        k0 = _line([(K, v[0]) for K, v in lines.items()])
        k1 = _line([(K, v[1]) for K, v in lines.items()])
    else:
        (only,) = lines.values()
        k0, k1 = (only[0], 0.0), (only[1], 0.0)
    imb: List[float] = []
    for r in runs:
        costs = instance_costs(r)
        if len(costs) > 1 and sum(costs) > 0:
            imb.append(max(costs) * len(costs) / sum(costs))
    return {"lines": lines, "k0": k0, "k1": k1, "k_measured": sorted(lines), "imbalance": max(imb) if imb else None}


def redis_line(model: Dict[str, Any], K: int) -> Tuple[float, float]:
    """(r0_K, r1_K): fitted where K was measured, else linear in K (see :func:`shard_model`)."""
    if K in model["lines"]:
        return model["lines"][K]
    return model["k0"][0] + model["k0"][1] * K, model["k1"][0] + model["k1"][1] * K


def redis_all(model: Dict[str, Any], K: int, x: float) -> float:
    """Redis CPU µs per cluster publish, all K instances together, x processes with viewers."""
    r0, r1 = redis_line(model, K)
    return r0 + r1 * x


def redis_per_instance_pct(model: Dict[str, Any], K: int, P: int, M: float) -> float:
    """% of one core each of K instances spends at M cluster publishes/s, P processes with viewers."""
    return M * redis_all(model, K, P) / K / 1e4


def inboxes_per_call(x: int, per_call: float) -> float:
    """Expected distinct inboxes one script call reaches: ``per_call`` plain page messages whose
    pages have one viewer each, spread evenly over ``x`` processes (the publisher's own among them)."""
    if x <= 0:
        return 0.0
    return x * (1 - (1 - 1 / x) ** per_call)


def event_features(K: int, x: int, batch: int) -> Tuple[float, float, float]:
    """What one instance of K does per cluster publish, x processes with viewers, HTTP batches of
    ``batch``: (script calls, inboxes reached by those calls, envelopes). A batch gives each
    instance that one of its page groups hashes to one call (probability 1 - (1 - 1/K)^batch)."""
    reached = 1 - (1 - 1 / K) ** batch
    per_call = batch / K / reached
    calls = reached / batch
    return calls, calls * inboxes_per_call(x, per_call), 1 / K


def _solve3(a: List[List[float]], b: List[float]) -> List[float]:
    """The 3 x 3 linear system a z = b (Gaussian elimination with partial pivoting)."""
    m = [row[:] + [v] for row, v in zip(a, b)]
    for i in range(3):
        piv = max(range(i, 3), key=lambda r: abs(m[r][i]))
        m[i], m[piv] = m[piv], m[i]
        if abs(m[i][i]) < 1e-18:
            raise ValueError("the runs do not determine the event model (vary K and P)")
        for r in range(i + 1, 3):
            f = m[r][i] / m[i][i]
            m[r] = [u - f * w for u, w in zip(m[r], m[i])]
    z = [0.0, 0.0, 0.0]
    for i in (2, 1, 0):
        z[i] = (m[i][3] - sum(m[i][j] * z[j] for j in range(i + 1, 3))) / m[i][i]
    return z


def event_model(runs: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Redis CPU per cluster publish of ONE instance as what it does (least squares over every
    run, one viewer per page): c_call per script call, c_inbox per inbox a call reaches (its
    XADD and trim, the reader's wake-up, its XREAD reply and the next XREAD), c_env per envelope.
    Unlike :func:`shard_model` (lines in x, then linear in K), it says why K instances do not cut
    an instance's cost to 1/K: every publish batch still makes one call per instance, and a call
    of fewer envelopes still reaches nearly as many inboxes."""
    rows, ys = [], []
    for r in runs:
        batch = int(r["config"].get("batch", 100))
        rows.append(event_features(shards(r), redis_x(r), batch))
        ys.append(r["watched"]["redis_cpu_us_per_publish"] / shards(r))
    ata = [[sum(f[i] * f[j] for f in rows) for j in range(3)] for i in range(3)]
    aty = [sum(f[i] * y for f, y in zip(rows, ys)) for i in range(3)]
    c_call, c_inbox, c_env = _solve3(ata, aty)
    return {"c_call": c_call, "c_inbox": c_inbox, "c_env": c_env}


def event_per_instance(model: Dict[str, float], K: int, x: int, batch: int = 100) -> float:
    """Redis CPU µs per cluster publish of one of K instances (:func:`event_model`)."""
    calls, inboxes, envs = event_features(K, x, batch)
    return model["c_call"] * calls + model["c_inbox"] * inboxes + model["c_env"] * envs


def project_events(model: Dict[str, float], runs: Sequence[Dict[str, Any]], ks: Sequence[int]) -> List[str]:
    """The event model: its parameters, predicted vs measured per run, and Redis % of one core
    per instance at P = 16 for each K (batches of 100)."""
    out = ["", "Redis per instance as what it does (event model, least squares over every run with one viewer per "
           "page): µs per script call, per inbox a call reaches, per envelope:", "",
           "| c_call | c_inbox | c_env |", "|---|---|---|",
           f"| {model['c_call']:.1f} | {model['c_inbox']:.1f} | {model['c_env']:.2f} |", "",
           "| run | K | x | inboxes per call | Redis per instance: predicted / measured |", "|---|---|---|---|---|"]
    for r in runs:
        K, x, batch = shards(r), redis_x(r), int(r["config"].get("batch", 100))
        calls, inboxes, _ = event_features(K, x, batch)
        out.append(f"| {r['_path'].replace('.json', '')} | {K} | {x} | {inboxes / calls:.1f} | "
                   f"{event_per_instance(model, K, x, batch):.1f} / {r['watched']['redis_cpu_us_per_publish'] / K:.1f} |")
    out += ["", "Event model: Redis % of one core per instance at P = 16 processes with viewers, batches of 100:", "",
            "| K | inboxes per call | µs per cluster publish | " + " | ".join(f"{m:,}/s" for m in PROJECT_M) + " |",
            "|---|---|---" + "|---" * len(PROJECT_M) + "|"]
    for K in ks:
        calls, inboxes, _ = event_features(K, 16, 100)
        us = event_per_instance(model, K, 16)
        out.append(f"| {K} | {inboxes / calls:.1f} | {us:.1f} | " + " | ".join(f"{m * us / 1e4:,.0f}%" for m in PROJECT_M) + " |")
    return out


def _runs_table(runs: Sequence[Dict[str, Any]]) -> List[str]:
    out = ["| run | P (idle) | K | pages | load | publishes/s | lost | idle proc µs/cluster publish | active proc µs/cluster publish | "
           "Redis µs/publish, all instances | Redis µs/publish, each instance | script µs/publish | XREAD µs/publish |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        w = r["watched"]
        idle = mean([x["cpu_us_per_cluster_publish"] for x in w["per_process"] if x["idle"]])
        act = mean([x["cpu_us_per_cluster_publish"] for x in w["per_process"] if not x["idle"]])
        each = " / ".join(fmt(c) for c in instance_costs(r))
        out.append(f"| {r['_path'].replace('.json', '')} | {r['config']['processes']} ({r['config']['idle_processes']}) | "
                   f"{shards(r)} | {r['config']['pages']:,} | {r['loadavg_at_start'][0]:.1f} | {w['publishes_per_s']:,.0f} | "
                   f"{r['lost']} | {fmt(idle, '{:.2f}')} | {fmt(act)} | {fmt(w['redis_cpu_us_per_publish'])} | {each} | "
                   f"{fmt(_cmd(r, 'evalsha'))} | {fmt(_cmd(r, 'xread'), '{:.2f}')} |")
    return out


def summarize(paths: Sequence[str], calibrate_max_p: int, project_shards: Optional[Sequence[int]] = None) -> str:
    """Markdown: every run, the model's parameters per K, predicted vs measured, the projections
    per K measured (processes, and Redis per instance), and Redis per instance for every K of
    ``project_shards``."""
    runs = []
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        run["_path"] = os.path.basename(path)
        runs.append(run)
    runs.sort(key=lambda r: (r["config"]["processes"], r["config"]["idle_processes"], r["config"]["pages"],
                             shards(r), r["_path"]))
    calib_all = [r for r in runs if r["config"]["viewers"] == 1] or runs  # other V: predicted, not fitted
    ks = sorted({shards(r) for r in runs})
    smodel = shard_model(calib_all, calibrate_max_p)
    sfull = shard_model(calib_all, max(r["config"]["processes"] for r in calib_all))
    design = "per-group routing" if any(routed(r) for r in runs) else "one stream read by every process"
    out = [f"## {design}: {len(runs)} runs, K = {', '.join(map(str, ks))} Redis instance(s)", ""] + _runs_table(runs)
    for K in ks:
        calib = [r for r in calib_all if shards(r) == K] or [r for r in runs if shards(r) == K]
        prm = parameters(calib, calibrate_max_p)
        full = parameters(calib, max(r["config"]["processes"] for r in calib))
        title = f"K = {K}: p" if len(ks) > 1 else "P"
        out += ["", f"{title}arameters (µs, from the runs with one viewer per page): c_in and the Redis line calibrated on "
                f"the runs with P <= {calibrate_max_p}, and on all runs (Redis per publish, all instances = r0 + r1 x: x = P "
                "with one stream, the processes with viewers with routing)", "",
                f"| symbol | P <= {calibrate_max_p} | all runs |", "|---|---|---|"]
        for k in ("c_read", "c_pub", "c_del", "c_in", "r0", "r1", "xread_per_reader", "idle_util"):
            spec = "{:.4f}" if k == "idle_util" else "{:.2f}"  # a fraction of one core
            out.append(f"| {k} | {fmt(prm[k], spec)} | {fmt(full[k], spec)} |")
        out += ["", f"{'K = %d: p' % K if len(ks) > 1 else 'P'}redicted (parameters of P <= {calibrate_max_p}) vs measured, "
                "µs per cluster publish (Redis: all instances):", "",
                "| run | P (idle) | idle proc: predicted / measured | active proc: predicted / measured | Redis: predicted / measured |",
                "|---|---|---|---|---|"]
        for r in [r for r in runs if shards(r) == K]:
            q = predict(r, prm)
            out.append(f"| {r['_path'].replace('.json', '')} | {r['config']['processes']} ({r['config']['idle_processes']}) | "
                       f"{fmt(q['idle_predicted'], '{:.2f}')} / {fmt(q['idle_measured'], '{:.2f}')} | "
                       f"{fmt(q['active_predicted'])} / {fmt(q['active_measured'])} | "
                       f"{fmt(q['redis_predicted'])} / {fmt(q['redis_measured'])} |")
        for V in (1, 2):
            out += ["", f"{'K = %d: p' % K if len(ks) > 1 else 'P'}rojection (all-runs parameters), {V} viewer(s) per page: "
                    "per process % of a core on envelopes without local recipient / per process % in all / Redis % of a core"
                    + (", each instance" if K > 1 else ""), "",
                    "| P \\ M | " + " | ".join(f"{m:,}/s" for m in PROJECT_M) + " |", "|---" * (len(PROJECT_M) + 1) + "|"]
            for P in PROJECT_P:
                cells = []
                for m in PROJECT_M:
                    waste, total, _ = project(full, P, m, V)
                    cells.append("{:,.1f}% / {:,.0f}% / {:,.0f}%".format(waste, total, redis_per_instance_pct(sfull, K, P, m)))
                out.append(f"| {P} | " + " | ".join(cells) + " |")
    out += ["", "Redis per publish, all instances = r0_K + r1_K x, per K (µs; P <= "
            f"{calibrate_max_p} / all runs)" + ("; r0 and r1 linear in K between the K measured" if len(ks) > 1 else
                                              "; one K measured: other K assume the same all-instance cost") + ":", "",
            "| K | r0_K | r1_K |", "|---|---|---|"]
    for K in sorted(set(ks) | set(project_shards or ())):
        c = redis_line(smodel, K)
        a = redis_line(sfull, K)
        out.append(f"| {K}{'' if K in smodel['lines'] else ' (not measured)'} | {c[0]:.2f} / {a[0]:.2f} | "
                   f"{c[1]:.2f} / {a[1]:.2f} |")
    if sfull["imbalance"]:
        out += ["", f"Busiest instance over the mean of its run, at most: {sfull['imbalance']:.2f} (the projections assume an even spread)."]
    if project_shards:
        out += project_redis(sfull, project_shards)
        routed_runs = [r for r in calib_all if routed(r)]
        try:
            emodel = event_model(routed_runs) if routed_runs else None
        except ValueError:
            emodel = None  # one K and one P only: not determined
        if emodel is not None:
            out += project_events(emodel, routed_runs, sorted(set(ks) | set(project_shards)))
    return "\n".join(out) + "\n"


def project_redis(model: Dict[str, Any], ks: Sequence[int]) -> List[str]:
    """Redis % of one core per instance, P processes with viewers x M publishes/s, for each K."""
    out: List[str] = []
    for K in ks:
        note = "" if K in model["lines"] else " (K not measured: " + (
            "interpolated/extrapolated linearly in K)" if len(model["lines"]) > 1 else "all-instance cost of the K measured)")
        out += ["", f"Redis % of one core per instance, K = {K}{note} (all-runs fit), every process with viewers:", "",
                "| P \\ M | " + " | ".join(f"{m:,}/s" for m in PROJECT_M) + " |", "|---" * (len(PROJECT_M) + 1) + "|"]
        for P in PROJECT_P:
            out.append(f"| {P} | " + " | ".join(f"{redis_per_instance_pct(model, K, P, m):,.0f}%" for m in PROJECT_M) + " |")
    return out


PROJECT_P = (2, 4, 8, 16, 32, 64)
PROJECT_M = (10000, 50000, 100000, 200000)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=DEFAULTS["processes"], help="tornado-rt processes P (1..8)")
    ap.add_argument("--idle-processes", type=int, default=DEFAULTS["idle_processes"],
                    help="of those, how many get no subscriber and no publish (0..P-1)")
    ap.add_argument("--pages", type=int, default=DEFAULTS["pages"], help="pages (tables) N with viewers")
    ap.add_argument("--viewers", type=int, default=DEFAULTS["viewers"], help="viewers per page")
    ap.add_argument("--messages", type=int, default=DEFAULTS["messages"],
                    help="messages of the watched phase (rounded down to whole rounds of one per page)")
    ap.add_argument("--unwatched-messages", type=int, default=DEFAULTS["unwatched_messages"],
                    help="messages to pages nobody watches (0: skip that phase)")
    ap.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="messages per POST /api/publish")
    ap.add_argument("--window", type=int, default=DEFAULTS["window"], help="rounds ahead of the slowest viewer")
    ap.add_argument("--publisher", choices=("http", "redis"), default=DEFAULTS["publisher"],
                    help="http: POST /api/publish round-robin over the active processes; "
                         "redis: RedisPublisher from this process")
    ap.add_argument("--shards", type=int, default=DEFAULTS["shards"],
                    help="K Redis instances the page groups are partitioned over (every process and "
                         "--publisher redis get all K URLs: --broker url1,...,urlK)")
    ap.add_argument("--workers", type=int, default=DEFAULTS["workers"], help="load-client processes")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="placement of viewers on processes")
    ap.add_argument("--drain-timeout", type=float, default=DEFAULTS["drain_timeout"],
                    help="seconds to wait for the last messages")
    ap.add_argument("--out", default=os.path.join(bench.RESULTS_DIR, "redis-scale"), help="writes OUT.json and OUT.md")
    ap.add_argument("--summarize", nargs="+", metavar="JSON",
                    help="instead of measuring: the model's parameters from these runs, predicted vs measured, "
                         "and the P x M projection (Markdown on stdout)")
    ap.add_argument("--project-shards", metavar="K1,K2,...",
                    help="--summarize: also the Redis %% of a core per instance for these K (e.g. 1,3,4), "
                         "P up to 64, M up to 200,000/s")
    ap.add_argument("--calibrate-max-p", type=int, default=4,
                    help="--summarize: calibrate on the runs with at most this many processes, predict the others")
    a = ap.parse_args(argv)
    if a.summarize:
        ks = [int(k) for k in a.project_shards.split(",")] if a.project_shards else None
        if ks is not None and any(k < 1 for k in ks):
            ap.error("--project-shards: K at least 1")
        print(summarize(a.summarize, a.calibrate_max_p, ks))
        return 0
    if not 1 <= a.processes <= 8:
        ap.error("--processes: 1 to 8")
    if not 0 <= a.idle_processes < a.processes:
        ap.error("--idle-processes: 0 to --processes minus 1")
    for name in ("pages", "viewers", "messages", "batch", "window", "workers", "shards"):
        if getattr(a, name) < 1:
            ap.error(f"--{name}: at least 1")
    if a.unwatched_messages < 0:
        ap.error("--unwatched-messages: at least 0")
    cfg = {**DEFAULTS, **{k: v for k, v in vars(a).items() if k not in ("out", "summarize", "calibrate_max_p", "project_shards")}, "settle": DEFAULTS["settle"]}
    cfg["lifetime"] = 1800.0
    result = measure(cfg)
    md = markdown(result)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(a.out + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {a.out}.json and {a.out}.md")
    ok = result["lost"] == 0 and result["order_errors"] == 0 and result["watched"]["drained"] and result["cluster_alive"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
