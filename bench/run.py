#!/usr/bin/env python
"""tornado-rt benchmark: tornado-rt against reference servers (websockets, naive Tornado, Django
Channels, Centrifuge in Go) side by side, in one run.

    python bench/run.py --quick     # smoke run, small numbers, about 3-4 minutes
    python bench/run.py             # the full measurement (about 20 minutes on 2 cores)
    python bench/run.py --profile   # py-spy profile of tornado-rt during the 1,000-subscriber fan-out
    python bench/run.py --quick --scenarios http-pages --servers tornado-rt,websockets,floor

See bench/README.md for what every number means. Each server runs in its own process (started
fresh for every scenario), the load client in ``--workers`` other processes, the publisher in
this one; all traffic stays on 127.0.0.1 and every child process is ended when this one ends
(normally, on error or on Ctrl-C).
"""
from __future__ import annotations

import argparse
import array
import asyncio
import atexit
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
SERVERS_DIR = os.path.join(HERE, "servers")
RESULTS_DIR = os.path.join(HERE, "results")
sys.path.insert(0, HERE)
sys.path.insert(1, SERVERS_DIR)

import wsclient  # noqa: E402
from wsclient import Stats, open_connection  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")

SERVERS = {  # name -> (script, label)
    "tornado-rt": ("tornado_rt_server.py", "tornado-rt"),
    "naive-tornado": ("naive_tornado.py", "naive Tornado"),
    "websockets": ("websockets_broadcast.py", "websockets.broadcast"),
    "channels": ("channels_server.py", "Channels+daphne"),
    # two tornado_rt_server.py processes sharing a bench-owned redis-server (RedisPair below)
    "tornado-rt-redis": ("tornado_rt_server.py", "tornado-rt, 2 procs + Redis"),
    # the Go anchor: Centrifuge v0.15 built from Debian's packages (centrifuge_binary below)
    "centrifuge-1": ("centrifuge_server.go", "Centrifuge (Go), GOMAXPROCS=1"),
    "centrifuge": ("centrifuge_server.go", "Centrifuge (Go), default GOMAXPROCS"),
    # HTTP scenarios only: tornado-rt on uvloop, the socket.send() floor, a bare Tornado handler
    "tornado-rt-uvloop": ("tornado_rt_server.py", "tornado-rt on uvloop"),
    # storm/memory only: tornado-rt on Tornado's own app.listen (the default listens as `serve` does)
    "tornado-rt-applisten": ("tornado_rt_server.py", "tornado-rt on app.listen"),
    "floor": ("floor_server.py", "floor: bare socket.send()"),
    "tornado-bare": ("bare_tornado_http.py", "bare Tornado handler"),
}
SCENARIOS = ("fanout", "latency", "pages", "memory", "storm", "http-pages", "http-single", "redis-pages")
# Which scenarios a server takes part in (scenario key prefix); the others read "n/a".
WS = {"fanout", "latency", "pages", "memory", "storm"}
SUPPORTS = {
    "tornado-rt": set(SCENARIOS),
    "naive-tornado": WS,
    "websockets": WS | {"http-pages"},
    "channels": WS,
    "tornado-rt-redis": {"fanout", "latency", "redis-pages"},
    "centrifuge-1": WS | {"http-pages"},
    "centrifuge": WS | {"http-pages"},
    "tornado-rt-uvloop": {"http-pages", "http-single"},
    "tornado-rt-applisten": {"memory", "storm"},
    "floor": {"http-pages", "latency", "storm"},
    "tornado-bare": {"http-single"},
}
# The HTTP scenarios run tornado-rt as `tornado-rt serve` (its own HTTP API), not embedded.
SERVE_SCRIPT = "tornado_rt_serve.py"
HTTP_SCENARIOS = {"http-pages", "http-single", "redis-pages"}
SERVER_ARGS = {"tornado-rt-uvloop": ["--uvloop"], "tornado-rt-applisten": ["--plain-listen"]}
# --server-loop: the event loop tornado-rt's own server scripts run on ("asyncio", or "uvloop" when
# installed: they get --uvloop); the other servers keep theirs.
SERVER_LOOP = {"loop": "asyncio"}
# How tornado-rt-redis's processes reach their redis-server (--redis-unix): "tcp" (loopback) or
# "unix" (a Unix domain socket; the TCP port stays open for this script's INFO calls).
REDIS_TRANSPORT = {"transport": "tcp"}
LOOP_SCRIPTS = ("tornado_rt_server.py", SERVE_SCRIPT)
OWN_HTTP_PORT = {"websockets", "floor"}  # serve POST /api/publish on a second port (common.HttpApi)
SERVER_ENV = {"centrifuge-1": {"GOMAXPROCS": "1"}}  # the default: Go's own (one P per CPU)
PROTOCOL = {"centrifuge-1": wsclient.CENTRIFUGE, "centrifuge": wsclient.CENTRIFUGE}  # else Baserow's

FULL = dict(fanout_sizes=[1000, 5000], duration=10.0, batch=8, window=48,
            latency_subs=1000, latency_rate=200.0, latency_warmup=1.0, latency_sample=10,
            latency_lazy_period=0.1,
            pages_conns=5000, pages_chunk=250, pages_window=2,
            memory_conns=10000, memory_warm=100, storm_conns=5000,
            http_pages=2000, http_messages=100000, http_batch=100, http_window=2,
            http_single_requests=10000, http_single_warm=500,
            redis_pages=1000, redis_messages=100000, redis_unwatched=20000,
            concurrency=128, drain_timeout=60.0, latency_drain=20.0, settle=3.0)
QUICK = dict(FULL, fanout_sizes=[200], duration=2.0, latency_subs=200, latency_warmup=0.5,
             pages_conns=200, memory_conns=1000, memory_warm=20, storm_conns=500,
             http_pages=200, http_messages=10000, http_single_requests=2000, http_single_warm=200,
             redis_pages=200, redis_messages=10000, redis_unwatched=5000,
             drain_timeout=15.0, latency_drain=10.0, settle=2.0)

# http-pages (issue 16 item 1): the issue's shape (2,000 pages) in both modes, measured in
# ``http_windows`` windows of ``http_messages`` messages whose median is reported with the spread.
# One quick window of 10,000 messages used 0.3-1 s of server CPU, and its ratio to websockets
# swung 0.69-1.57x on this shared 2-core machine; five windows use 3-4 s per server.
FULL.update(http_messages=40000, http_windows=5)
QUICK.update(http_pages=2000, http_messages=20000, http_windows=5)
# redis-pages (issue 16 item 5): the watched part in ``redis_windows`` windows of
# ``redis_messages`` publishes, the median of each figure (one process; A, B, redis-server)
# reported with the spread. Two quick single-window runs gave A / one process = 2.40x and 1.14x:
# the one-process reference swung 25-50 µs per publish.
# With both tornado-rt and tornado-rt-redis in --servers, redis-pages runs them side by side
# (paired_redis_pages): both started, the same pages and subscribers on each, and measured in
# alternating window pairs (one process, then Redis mode, ...); each pair's ratio and their median
# are reported. Run one after the other, minutes apart, the ratio swung 1.39-1.86x on this busy
# 2-core machine; a pair's two windows are seconds apart and see the same load.
FULL.update(redis_windows=7)
QUICK.update(redis_windows=5)

# --- child process bookkeeping ---------------------------------------------------------------------
_children: List[Any] = []


def _cleanup() -> None:
    for child in list(_children):
        try:
            child.stop()
        except Exception:
            pass
    _children.clear()


atexit.register(_cleanup)


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads) in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_ns(pid: int) -> float:
    """On-CPU seconds of a process's live threads, from /proc/<pid>/task/*/schedstat
    (nanoseconds): the same quantity as :func:`proc_cpu` without its 10 ms clock-tick steps,
    which matter for windows of a few tenths of a second (quick runs, Redis). Falls back to
    :func:`proc_cpu` where schedstat is missing."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        return proc_cpu(pid)


def proc_rss(pid: int) -> int:
    """VmRSS of a process in bytes, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def machine_cpu() -> Tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat, to tell how loaded the machine was."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server under test, in its own process (and session, so Ctrl-C reaches only us)."""

    def __init__(self, name: str, log_name: str, lifetime: float, extra_args: Sequence[str] = (),
                 script: Optional[str] = None):
        self.name = name
        self.port = free_port()
        os.makedirs(os.path.join(RESULTS_DIR, "logs"), exist_ok=True)
        self.log_path = os.path.join(RESULTS_DIR, "logs", f"{log_name}.log")
        self.ready_file = os.path.join(tempfile.gettempdir(), f"tornado-rt-bench-{os.getpid()}-{self.port}.ready")
        script = os.path.join(SERVERS_DIR, script or SERVERS[name][0])
        command = [centrifuge_binary()] if script.endswith(".go") else [sys.executable, script]
        loop_args = ["--uvloop"] if SERVER_LOOP["loop"] == "uvloop" and os.path.basename(script) in LOOP_SCRIPTS else []
        extra_args = [*SERVER_ARGS.get(name, []), *loop_args, *extra_args]
        self.http_port = self.port  # where POST /api/publish is served
        if name in OWN_HTTP_PORT:
            self.http_port = free_port()
            extra_args += ["--http-port", str(self.http_port)]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*command, "--port", str(self.port), "--ready-file", self.ready_file,
             "--lifetime", str(lifetime), *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **SERVER_ENV.get(name, {})},
            start_new_session=True, preexec_fn=_die_with_parent, cwd=HERE)
        _children.append(self)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        while not os.path.exists(self.ready_file):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start within 60 s; see {self.log_path}")
            time.sleep(0.02)

    def cpu(self) -> float:
        return proc_cpu_ns(self.pid)

    def rss(self) -> int:
        return proc_rss(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        _terminate(self.proc)
        self.log.close()
        try:
            os.unlink(self.ready_file)
        except FileNotFoundError:
            pass
        if self in _children:
            _children.remove(self)


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class RedisServer:
    """A private redis-server for the ``tornado-rt-redis`` variant: loopback only, a fresh port,
    no persistence (``--save ''``, no AOF), ended with the other children."""

    def __init__(self, log_name: str):
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(exe):
            raise RuntimeError("redis-server not found (Debian package redis-server)")
        self.port = free_port()
        self.version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
        self.unix_path: Optional[str] = None
        extra: List[str] = []
        if REDIS_TRANSPORT["transport"] == "unix":
            self.unix_path = os.path.join(tempfile.mkdtemp(prefix="bench-redis-"), "redis.sock")
            extra = ["--unixsocket", self.unix_path, "--unixsocketperm", "700"]
        os.makedirs(os.path.join(RESULTS_DIR, "logs"), exist_ok=True)
        self.log_path = os.path.join(RESULTS_DIR, "logs", f"{log_name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent, cwd=tempfile.gettempdir())
        _children.append(self)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 10
        while not self._pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start (exit code {self.proc.returncode}); "
                                   f"see {self.log_path}")
            time.sleep(0.02)

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def url(self) -> str:
        """What the servers are given: the Unix socket with --redis-unix, else TCP on loopback."""
        if self.unix_path:
            return f"unix://{self.unix_path}?db=0"
        return f"redis://127.0.0.1:{self.port}/0"

    def cpu(self) -> float:
        """On-CPU seconds of all its threads (schedstat: Redis uses only a few clock ticks of
        utime + stime in a measured window)."""
        return proc_cpu_ns(self.pid)

    def commandstats(self) -> Dict[str, Tuple[int, int]]:
        """``INFO commandstats``: command -> (calls, usec), the script's inner calls included
        (Redis counts each ``redis.call`` of a script as a call of that command too)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"INFO commandstats\r\n")
            data = b""
            while not data.startswith(b"$") or b"\r\n" not in data:
                data += s.recv(65536)
            size = int(data[1:data.index(b"\r\n")])
            want = data.index(b"\r\n") + 2 + size + 2
            while len(data) < want:
                data += s.recv(65536)
        out: Dict[str, Tuple[int, int]] = {}
        for line in data.decode().splitlines():
            if line.startswith("cmdstat_"):
                name, fields = line[len("cmdstat_"):].split(":", 1)
                kv = dict(f.split("=", 1) for f in fields.split(","))
                out[name] = (int(kv["calls"]), int(kv["usec"]))
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        _terminate(self.proc)
        self.log.close()
        if self in _children:
            _children.remove(self)


class RedisPair:
    """``tornado-rt-redis``: a RedisServer and two tornado_rt_server.py processes (A, B) using it
    as their broker. Quacks like a ServerProcess: ``port`` is A's (the publish trigger goes there),
    ``ports`` both (the load client splits its connections over them), ``cpu()`` is A + B; Redis's
    CPU is read separately through ``redis``."""

    def __init__(self, name: str, log_name: str, lifetime: float, script: Optional[str] = None,
                 clients_on_a_only: bool = False):
        self.name = name
        self.procs: List[ServerProcess] = []
        self.redis = RedisServer(f"{log_name}-redis")
        try:
            for part in ("a", "b"):
                self.procs.append(ServerProcess(name, f"{log_name}-{part}", lifetime,
                                                ["--broker", self.redis.url], script=script))
        except BaseException:
            self.stop()
            raise
        self.port = self.procs[0].port
        self.http_port = self.procs[0].http_port
        self.ports = [self.port] if clients_on_a_only else [p.port for p in self.procs]
        self.pid = self.procs[0].pid

    def cpu(self) -> float:
        return sum(p.cpu() for p in self.procs)

    def cpu_by_process(self) -> List[float]:
        return [p.cpu() for p in self.procs]

    def rss(self) -> int:
        return sum(p.rss() for p in self.procs)

    def alive(self) -> bool:
        return self.redis.alive() and all(p.alive() for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        self.redis.stop()


class Unavailable(Exception):
    """A server that cannot run on this machine (reported "n/a", not as an error)."""


GOPATH = "/usr/share/gocode"  # Debian's Go library packages install their source here
GO_SOURCE = os.path.join(SERVERS_DIR, "centrifuge_server.go")
GO_BINARY = os.path.join(RESULTS_DIR, "bin", "centrifuge-server")
GO_PACKAGES = {  # import path -> Debian package
    "github.com/centrifugal/centrifuge": "golang-github-centrifugal-centrifuge-dev",
    "github.com/centrifugal/protocol": "golang-github-centrifugal-protocol-dev",
    "github.com/FZambia/eagle": "golang-github-fzambia-eagle-dev",
    "github.com/igm/sockjs-go": "golang-github-igm-sockjs-go-dev",
    "github.com/mna/redisc": "golang-github-mna-redisc-dev",
}
_go_build: Dict[str, str] = {}  # "binary" or "missing" (why), once per run


def centrifuge_missing() -> str:
    """Why the Centrifuge reference cannot be built here ("" when it can)."""
    if not shutil.which("go"):
        return "`go` not found (Debian package golang-go)"
    absent = [deb for path, deb in GO_PACKAGES.items() if not os.path.isdir(os.path.join(GOPATH, "src", path))]
    return "missing Debian packages: " + ", ".join(absent) if absent else ""


def centrifuge_binary() -> str:
    """Build bench/servers/centrifuge_server.go (GOPATH mode, offline, against Debian's packages)
    into bench/results/bin/ once per run, or reuse a binary newer than the source; raises
    Unavailable when go or a package is missing or the build fails."""
    if "binary" in _go_build:
        return _go_build["binary"]
    if "missing" in _go_build:
        raise Unavailable(_go_build["missing"])
    why = centrifuge_missing()
    if not why and not (os.path.exists(GO_BINARY) and os.path.getmtime(GO_BINARY) >= os.path.getmtime(GO_SOURCE)):
        os.makedirs(os.path.dirname(GO_BINARY), exist_ok=True)
        env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": "", "GOPROXY": "off",
               "GOCACHE": os.path.join(RESULTS_DIR, "bin", "go-cache")}
        build = subprocess.run(["go", "build", "-o", GO_BINARY + ".tmp", GO_SOURCE], env=env, cwd=HERE,
                               capture_output=True, text=True, timeout=600)
        if build.returncode:
            why = "go build failed: " + (build.stderr.strip().splitlines() or ["?"])[-1][:300]
        else:
            os.replace(GO_BINARY + ".tmp", GO_BINARY)
    if why:
        _go_build["missing"] = why
        raise Unavailable(why)
    _go_build["binary"] = GO_BINARY
    return GO_BINARY


def start_server(name: str, log_name: str, lifetime: float, script: Optional[str] = None):
    if name == "tornado-rt-redis":
        return RedisPair(name, log_name, lifetime, script, clients_on_a_only=script == SERVE_SCRIPT)
    return ServerProcess(name, log_name, lifetime, script=script)


def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGTERM if this process dies, whatever the way (Linux prctl)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the server's own --lifetime still ends it
        pass


class ClientPool:
    """The load client processes; connection i goes to worker i % workers and to server port
    ports[i % len(ports)] (one port except for tornado-rt-redis: an even split over A and B)."""

    def __init__(self, workers: int, ports: Sequence[int], lifetime: float, proto: str = wsclient.BASEROW):
        ctx = mp.get_context("spawn")
        self.proto = proto
        self.n = workers
        self.ports = list(ports)
        port = self.ports[0]
        self.totals = ctx.RawArray("q", workers)
        self.mins = ctx.RawArray("q", workers)
        self.commands = []
        self.replies = []
        self.procs = []
        for i in range(workers):
            cmd_r, cmd_w = ctx.Pipe(duplex=False)
            rep_r, rep_w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=wsclient.worker_main, daemon=True, name=f"bench-client-{i}",
                            args=(i, cmd_r, rep_w, self.totals, self.mins, port, lifetime, SERVERS_DIR))
            p.start()
            cmd_r.close()
            rep_w.close()
            self.commands.append(cmd_w)
            self.replies.append(rep_r)
            self.procs.append(p)
        _children.append(self)

    def _ask(self, msgs: Sequence[tuple], timeout: float) -> List[tuple]:
        for pipe, msg in zip(self.commands, msgs):
            pipe.send(msg)
        replies = []
        deadline = time.monotonic() + timeout
        for i, pipe in enumerate(self.replies):
            while not pipe.poll(0.2):
                if not self.procs[i].is_alive():
                    raise RuntimeError(f"client worker {i} died (exit code {self.procs[i].exitcode})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"client worker {i} did not answer {msgs[i][0]!r} within {timeout:.0f} s")
            replies.append(pipe.recv())
        return replies

    def connect(self, specs: Sequence[Tuple[int, Tuple[int, ...]]], concurrency: int,
                timeout: float = 300.0) -> Dict[str, Any]:
        """Open ``specs`` (user id, table ids) connections; returns counts and timing."""
        self.prepare(specs)
        return self.open_prepared(concurrency, timeout)

    def prepare(self, specs: Sequence[Tuple[int, Tuple[int, ...]]]) -> None:
        """Make the JWTs and upgrade requests of ``specs`` in the workers (outside any timing)."""
        if len(self.ports) > 1:
            specs = [(user, pages, self.ports[i % len(self.ports)]) for i, (user, pages) in enumerate(specs)]
        self._ask([("prepare", list(specs[i::self.n]), self.proto) for i in range(self.n)], 120)

    def open_prepared(self, concurrency: int, timeout: float = 300.0) -> Dict[str, Any]:
        """Open the prepared connections; returns counts and timing."""
        per = max(1, concurrency // self.n)
        t0 = time.time()
        replies = self._ask([("connect", per)] * self.n, timeout)
        errors = sorted({e for r in replies for e in r[5]})
        return {"ok": sum(r[1] for r in replies), "failed": sum(r[2] for r in replies),
                "t0": t0, "t_last": max(r[4] for r in replies), "errors": errors[:5]}

    def latency(self, from_seq: Optional[int]) -> None:
        """Record latencies of messages with seq >= ``from_seq`` from now on (None: stop)."""
        self._ask([("latency", from_seq)] * self.n, 30)

    def lazy(self, sample: int, period: float) -> None:
        self._ask([("lazy", sample, period)] * self.n, 30)

    def report(self, expected: Optional[int]) -> Dict[str, Any]:
        replies = [r[1] for r in self._ask([("report", expected)] * self.n, 120)]
        out = {k: sum(r[k] for r in replies)
               for k in ("connections", "received", "reads", "order_errors", "unexpected", "closed")}
        out["msgs_per_read"] = out["received"] / out["reads"] if out["reads"] else None
        if expected is not None:
            out["lost"] = sum(r["lost"] for r in replies)
            out["extra"] = sum(r["extra"] for r in replies)
        out["errors"] = sorted({e for r in replies for e in r["errors"]})[:5]
        lat = array.array("q")
        lag = array.array("q")
        for r in replies:
            lat.frombytes(r["latency"])
            lag.frombytes(r.get("lag", b""))
        out["latency_us"] = lat
        out["lag_us"] = lag
        return out

    def total(self) -> int:
        return sum(self.totals[:])

    def minimum(self) -> int:
        return min(self.mins[:])

    def cpu(self) -> float:  # schedstat: no 10 ms steps (a quick storm's window is ~0.2 s)
        return sum(proc_cpu_ns(p.pid) for p in self.procs if p.is_alive())

    def stop(self) -> None:
        for pipe in self.commands:
            try:
                pipe.send(("exit",))
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)
        for pipe in self.commands + self.replies:
            pipe.close()
        if self in _children:
            _children.remove(self)


# --- publishing ------------------------------------------------------------------------------------
def trigger(seq: int, rounds: int, t0: int, n: int, ts: Optional[int] = None, large: bool = False) -> bytes:
    if large:
        return b'{"seq":%d,"rounds":%d,"t0":%d,"n":%d,"large":1}' % (seq, rounds, t0, n)
    if ts is None:
        return b'{"seq":%d,"rounds":%d,"t0":%d,"n":%d}' % (seq, rounds, t0, n)
    return b'{"seq":%d,"rounds":%d,"t0":%d,"n":%d,"ts":%d}' % (seq, rounds, t0, n, ts)


async def open_publisher(port: int):
    pub = await open_connection(port, "/bench/publish", Stats(), publisher=True)
    if pub.error:
        raise RuntimeError(f"publisher connection failed: {pub.error}")
    return pub


def send_round(pub, seq: int, rounds: int, ntables: int, chunk: int) -> None:
    """Publish ``rounds`` rounds starting at ``seq``; one round = one message to each table 1..ntables."""
    if ntables == 1:
        pub.send_text(trigger(seq, rounds, 1, 1))
        return
    for r in range(rounds):
        for t0 in range(1, ntables + 1, chunk):
            pub.send_text(trigger(seq + r, 1, t0, min(chunk, ntables + 1 - t0)))


async def wait_drained(pool: ClientPool, target: int, timeout: float, settle: float) -> bool:
    """Wait until every connection has ``target`` messages. Gives up (False) when ``timeout``
    passes, or when the count has moved and then stopped moving for ``settle`` seconds (a server
    that drops messages); what is missing then is reported as lost."""
    deadline = time.monotonic() + timeout
    last_total, last_change, moved = pool.total(), time.monotonic(), False
    while True:
        if pool.minimum() >= target:
            return True
        now = time.monotonic()
        total = pool.total()
        if total != last_total:
            last_total, last_change, moved = total, now, True
        elif (moved and now - last_change > settle) or now > deadline:
            return False
        await asyncio.sleep(0.002)


async def windowed(pool: ClientPool, server: ServerProcess, cfg: dict, ntables: int, rounds_per_send: int,
                   window: int, chunk: int) -> Dict[str, Any]:
    """Publish as fast as the server absorbs for ``duration`` s, never more than a window of rounds
    ahead of the slowest connection; then drain. Returns the measured window's figures.

    A warm-up round, fully delivered, comes first; its delivery time sets the window actually
    used: as many rounds as the server delivers in about a second, at least 2, at most
    ``window``. So a fast server always has work queued while a slow one never has more in
    flight than it can deliver in a few seconds (bounded drain, bounded buffers)."""
    pub = await open_publisher(server.port)
    try:
        t_warm, cpu_warm, total_warm = time.monotonic(), server.cpu(), pool.total()
        send_round(pub, 0, 1, ntables, chunk)
        seq = 1
        if not await wait_drained(pool, seq, max(cfg["drain_timeout"], 120.0), cfg["settle"]):
            # Not even one round arrives in full (a server that drops): report the warm-up itself.
            wall, cpu, delivered = time.monotonic() - t_warm, server.cpu() - cpu_warm, pool.total() - total_warm
            return {"error": "warm-up round not fully delivered; figures are over the warm-up",
                    "rounds": seq, "delivered": delivered, "wall_s": wall, "drained": False,
                    "msgs_per_s": delivered / wall, "server_cpu_s": cpu,
                    "cpu_s_per_million": cpu / delivered * 1e6 if delivered else None,
                    "server_cpu_util": cpu / wall}
        round_s = time.monotonic() - t_warm
        window = max(2, min(window, int(1.0 / round_s) if round_s > 0 else window))
        per_send = max(1, min(rounds_per_send, window // 2))
        drain_timeout = max(cfg["drain_timeout"], 3 * window * round_s)
        redis = getattr(server, "redis", None)  # tornado-rt-redis: its redis-server, counted apart
        total0, cpu0, ccpu0 = pool.total(), server.cpu(), pool.cpu()
        rcpu0 = redis.cpu() if redis else 0.0
        parts0 = server.cpu_by_process() if hasattr(server, "cpu_by_process") else None
        mbusy0, mall0 = machine_cpu()
        pcpu0 = self_cpu()
        t0 = time.monotonic()
        deadline = t0 + cfg["duration"]
        while time.monotonic() < deadline:
            while seq - pool.minimum() < window:
                send_round(pub, seq, per_send, ntables, chunk)
                seq += per_send
            await asyncio.sleep(0.001)
        drained = await wait_drained(pool, seq, drain_timeout, cfg["settle"])
        t1 = time.monotonic()
        cpu1, ccpu1, total1 = server.cpu(), pool.cpu(), pool.total()
        rcpu1 = redis.cpu() if redis else 0.0
        parts1 = server.cpu_by_process() if parts0 else None
        mbusy1, mall1 = machine_cpu()
        pcpu1 = self_cpu()
    finally:
        pub.close()
    delivered = total1 - total0
    wall = t1 - t0
    extra: Dict[str, Any] = {}
    if redis:
        publishes = (seq - 1) * ntables
        extra = {"redis_cpu_s": rcpu1 - rcpu0,
                 "redis_cpu_s_per_million": (rcpu1 - rcpu0) / delivered * 1e6 if delivered else None,
                 "redis_cpu_util": (rcpu1 - rcpu0) / wall if wall else 0.0,
                 "redis_cpu_us_per_publish": (rcpu1 - rcpu0) / publishes * 1e6 if publishes else None,
                 "redis_server": redis.version}
    if parts0:
        extra["server_cpu_s_by_process"] = [b - a for a, b in zip(parts0, parts1)]
    return {**extra, "rounds": seq, "measured_rounds": seq - 1, "warmup_round_s": round_s, "window": window,
            "rounds_per_trigger": per_send, "delivered": delivered,
            "wall_s": wall, "msgs_per_s": delivered / wall if wall else 0.0,
            "publishes_per_s": (seq - 1) * ntables / wall if wall else 0.0,
            "server_cpu_s": cpu1 - cpu0,
            "cpu_s_per_million": (cpu1 - cpu0) / delivered * 1e6 if delivered else None,
            "server_cpu_util": (cpu1 - cpu0) / wall if wall else 0.0,
            "client_cpu_util": (ccpu1 - ccpu0) / wall if wall else 0.0,
            "publisher_cpu_util": (pcpu1 - pcpu0) / wall if wall else 0.0,
            "machine_busy_cores": (mbusy1 - mbusy0) / (mall1 - mall0) * (os.cpu_count() or 1) if mall1 > mall0 else None,
            "drained": drained}


# --- the HTTP API publisher ---------------------------------------------------------------------------
import common  # noqa: E402  (bench/servers is on sys.path)


def _large_template() -> bytes:
    """common.rows_updated_large as a %-template (seq, ts, table_id), byte-identical to dumps()."""
    text = common.dumps(common.rows_updated_large(-333, -111, -222)).encode()
    for marker in (b"-111", b"-222", b"-333"):
        assert text.count(marker) == 1
    return text.replace(b"%", b"%%").replace(b"-111", b"%d", 1).replace(b"-222", b"%d", 1).replace(b"-333", b"%d", 1)


LARGE = _large_template()  # seq, ts, table_id in this order in the text
assert LARGE % (7, 8, 9) == common.dumps(common.rows_updated_large(9, 7, 8)).encode()


def batch_body(tables: Sequence[int], seq: int, ts: int) -> bytes:
    """``POST /api/publish`` body: one envelope per table, the message type's default audience."""
    return b'[{"message":' + b'},{"message":'.join(LARGE % (seq, ts, t) for t in tables) + b"}]"


class HttpClient:
    """One keep-alive HTTP/1.1 connection, one request at a time (``Content-Length`` answers)."""

    def __init__(self, port: int):
        self.port = port
        self.reader: Any = None
        self.writer: Any = None
        self.head = (b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: " % (port, common.API_KEY.encode()))

    async def open(self) -> "HttpClient":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def publish(self, body: bytes) -> bytes:
        self.writer.write(self.head + b"%d\r\n\r\n" % len(body) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        p = head.lower().find(b"\r\ncontent-length:")
        if p < 0:
            raise RuntimeError(f"answer without Content-Length: {head[:200]!r}")
        answer = await self.reader.readexactly(int(head[p + 17:head.find(b"\r\n", p + 2)]))
        if status != 200:
            raise RuntimeError(f"POST /api/publish: {status} {answer[:300]!r}")
        return answer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def settle_cpu(server, period: float = 0.3, timeout: float = 30.0) -> None:
    """Wait until no process of ``server`` (and its Redis) spends CPU any more: for work that
    goes on after the last answer (another process's share of a Redis publish)."""
    parts = getattr(server, "procs", [server])
    redis = getattr(server, "redis", None)
    deadline = time.monotonic() + timeout

    def read() -> List[float]:
        return [p.cpu() for p in parts] + ([redis.cpu()] if redis else [])

    last = read()
    while time.monotonic() < deadline:
        await asyncio.sleep(period)
        now = read()
        if all(b - a < 0.005 for a, b in zip(last, now)):
            return
        last = now


async def fixed_rounds(pool: Optional["ClientPool"], server, cfg: dict, rounds: int, send_round,
                       window: int, publishes_per_round: int) -> Dict[str, Any]:
    """Publish rounds 1..rounds with ``await send_round(seq)`` (round 0, fully delivered, is the
    warm-up), never more than ``window`` rounds ahead of the slowest connection; then drain.
    Without ``pool`` (nobody subscribed) nothing is waited for but the server's CPU settling.
    Returns the figures of the measured rounds, per process where the server has several."""
    await send_round(0)
    if pool is not None and not await wait_drained(pool, 1, max(cfg["drain_timeout"], 120.0), cfg["settle"]):
        raise RuntimeError("warm-up round not fully delivered")
    await settle_cpu(server)
    spy = Spy(server, cfg)
    redis = getattr(server, "redis", None)
    parts0 = server.cpu_by_process() if hasattr(server, "cpu_by_process") else None
    total0 = pool.total() if pool else 0
    ccpu0 = pool.cpu() if pool else 0.0
    stats0 = redis.commandstats() if redis else {}
    cpu0, rcpu0, (mbusy0, mall0), pcpu0 = server.cpu(), redis.cpu() if redis else 0.0, machine_cpu(), self_cpu()
    t0 = time.monotonic()
    for seq in range(1, rounds + 1):
        while pool is not None and seq - pool.minimum() >= window:
            await asyncio.sleep(0.001)
        await send_round(seq)
    drained = True
    if pool is not None:
        drained = await wait_drained(pool, rounds + 1, cfg["drain_timeout"], cfg["settle"])
    t1 = time.monotonic()
    if getattr(server, "procs", None) or pool is None:
        await settle_cpu(server)  # the other process and Redis may still be at work
    spy.stop()
    parts1 = server.cpu_by_process() if parts0 else None
    total1 = pool.total() if pool else 0
    ccpu1 = pool.cpu() if pool else 0.0
    cpu1, rcpu1, (mbusy1, mall1), pcpu1 = server.cpu(), redis.cpu() if redis else 0.0, machine_cpu(), self_cpu()
    stats1 = redis.commandstats() if redis else {}
    delivered, wall, publishes = total1 - total0, t1 - t0, rounds * publishes_per_round
    out: Dict[str, Any] = {
        "rounds": rounds + 1, "measured_rounds": rounds, "publishes": publishes, "delivered": delivered,
        "wall_s": wall, "msgs_per_s": delivered / wall if wall and pool else None,
        "publishes_per_s": publishes / wall if wall else 0.0, "server_cpu_s": cpu1 - cpu0,
        "cpu_s_per_million": (cpu1 - cpu0) / delivered * 1e6 if delivered else None,
        "cpu_us_per_publish": (cpu1 - cpu0) / publishes * 1e6 if publishes else None,
        "server_cpu_util": (cpu1 - cpu0) / wall if wall else 0.0,
        "client_cpu_util": (ccpu1 - ccpu0) / wall if wall and pool else None,
        "publisher_cpu_util": (pcpu1 - pcpu0) / wall if wall else 0.0,
        "machine_busy_cores": (mbusy1 - mbusy0) / (mall1 - mall0) * (os.cpu_count() or 1) if mall1 > mall0 else None,
        "window": window, "drained": drained}
    if parts0:
        out["server_cpu_s_by_process"] = [b - a for a, b in zip(parts0, parts1)]
        out["cpu_us_per_publish_by_process"] = [(b - a) / publishes * 1e6 for a, b in zip(parts0, parts1)]
    if redis:
        out["redis_cpu_s"] = rcpu1 - rcpu0
        out["redis_cpu_us_per_publish"] = (rcpu1 - rcpu0) / publishes * 1e6
        out["redis_server"] = redis.version
        # where Redis's time went, per command (INFO commandstats of the window, the INFO calls
        # themselves left out): calls and µs per publish; what is left of the CPU figure is
        # outside commands (reading requests, writing replies, the event loop)
        stats = {}
        for cmd, (calls, usec) in stats1.items():
            c0, u0 = stats0.get(cmd, (0, 0))
            if calls - c0 > 0 and cmd != "info":
                stats[cmd] = {"calls": calls - c0, "calls_per_publish": (calls - c0) / publishes,
                              "us_per_publish": (usec - u0) / publishes}
        out["redis_commandstats"] = stats
        # every process's reads together (XREAD per publish request: what a reader's turns cost)
        out["redis_calls"] = {cmd: v["calls"] for cmd, v in stats.items()}
        out["redis_xread_per_publish"] = out["redis_calls"].get("xread", 0) / publishes
    return out


class Spy:
    """py-spy on a server during a measured window (``--profile`` with an HTTP scenario): started
    after the warm-up, stopped with SIGINT (py-spy then writes its file) at the end. No-op
    unless ``cfg["profile"]``; the files are listed in ``cfg["profiles"]``."""

    def __init__(self, server, cfg: dict):
        self.proc: Optional[subprocess.Popen] = None
        if not cfg.get("profile"):
            return
        exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        log = getattr(server, "log_path", None) or server.procs[0].log_path
        self.raw = os.path.join(RESULTS_DIR, "profile-" + os.path.basename(log).replace(".log", ".txt"))
        self.proc = subprocess.Popen([exe, "record", "--pid", str(server.pid), "--rate", "200", "--nonblocking",
                                      "--format", "raw", "--output", self.raw],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _children.append(_Killable(self.proc))
        cfg.setdefault("profiles", []).append(self.raw)
        time.sleep(0.5)  # py-spy attaches

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            err = b""
        if not os.path.exists(self.raw):
            print("py-spy wrote nothing:", err.decode(errors="replace")[-500:], file=sys.stderr)


def http_sender(client: HttpClient, tables: Sequence[int], batch: int):
    """send_round for fixed_rounds: one round = one message to each table, in batches."""
    chunks = [tables[i:i + batch] for i in range(0, len(tables), batch)]

    async def send_round(seq: int) -> None:
        ts = time.time_ns() // 1000
        for chunk in chunks:
            await client.publish(batch_body(chunk, seq, ts))
    return send_round


# --- scenarios -------------------------------------------------------------------------------------
def _with_server(name: str, tag: str, cfg: dict, body, script: Optional[str] = None) -> Dict[str, Any]:
    server = start_server(name, f"{name}-{tag}", lifetime=cfg["lifetime"], script=script)
    try:
        pool = ClientPool(cfg["workers"], getattr(server, "ports", [server.port]), lifetime=cfg["lifetime"],
                          proto=PROTOCOL.get(name, wsclient.BASEROW))
    except BaseException:
        server.stop()
        raise
    try:
        result = body(server, pool)
        result["server_alive"] = server.alive()
        return result
    finally:
        pool.stop()
        server.stop()


def _setup(pool: ClientPool, specs, cfg) -> Dict[str, Any]:
    c = pool.connect(specs, cfg["concurrency"])
    if c["failed"]:
        raise RuntimeError(f"{c['failed']} of {len(specs)} connections failed: {c['errors']}")
    return c


def _finish(result: Dict[str, Any], report: Dict[str, Any]) -> Dict[str, Any]:
    result.update({k: report[k] for k in ("lost", "extra", "order_errors", "unexpected", "closed",
                                          "msgs_per_read") if k in report})
    result["connections"] = report["connections"]
    if report["errors"]:
        result["client_errors"] = report["errors"]
    return result


def scenario_fanout(name: str, subs: int, cfg: dict) -> Dict[str, Any]:
    def body(server, pool):
        c = _setup(pool, [(i + 1, (1,)) for i in range(subs)], cfg)
        result = asyncio.run(windowed(pool, server, cfg, 1, cfg["batch"], cfg["window"], 1))
        result["setup_s"] = c["t_last"] - c["t0"]
        return _finish(result, pool.report(result["rounds"]))
    return _with_server(name, f"fanout-{subs}", cfg, body)


def scenario_pages(name: str, cfg: dict) -> Dict[str, Any]:
    n = cfg["pages_conns"]

    def body(server, pool):
        _setup(pool, [(i + 1, (i + 1,)) for i in range(n)], cfg)
        result = asyncio.run(windowed(pool, server, cfg, n, 1, cfg["pages_window"], cfg["pages_chunk"]))
        return _finish(result, pool.report(result["rounds"]))
    return _with_server(name, "pages", cfg, body)


def scenario_latency(name: str, cfg: dict) -> Dict[str, Any]:
    subs, rate = cfg["latency_subs"], cfg["latency_rate"]

    async def drive(server, pool) -> Dict[str, Any]:
        pub = await open_publisher(server.port)
        try:
            async def paced(seq0: int, count: int) -> None:
                # Open loop: publish i is due at start + i/rate and carries that wall-clock time
                # as its timestamp, so any backlog (in the publisher, the kernel or the server's
                # inbound queue) counts as latency instead of silently lowering the rate.
                start = time.monotonic()
                start_us = time.time_ns() // 1000
                for i in range(count):
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    pub.send_text(trigger(seq0 + i, 1, 1, 1, start_us + int(i * 1e6 / rate)))

            warm = max(1, int(cfg["latency_warmup"] * rate))
            await paced(0, warm)
            warm_drained = await wait_drained(pool, warm, cfg["latency_drain"], cfg["settle"])
            pool.latency(warm)  # record latencies of seq >= warm only
            count = int(cfg["duration"] * rate)
            cpu0, t0, total0 = server.cpu(), time.monotonic(), pool.total()
            ccpu0, (mbusy0, mall0) = pool.cpu(), machine_cpu()
            await paced(warm, count)
            sent = time.monotonic() - t0
            drained = await wait_drained(pool, warm + count, cfg["latency_drain"], cfg["settle"])
            cpu1, t1, total1 = server.cpu(), time.monotonic(), pool.total()
            ccpu1, (mbusy1, mall1) = pool.cpu(), machine_cpu()
            delivered = total1 - total0
            return {"rounds": warm + count, "publishes": count, "publish_s": sent,
                    "achieved_rate": count / sent if sent else 0.0, "drained": drained,
                    "warmup_drained": warm_drained, "delivered": delivered, "server_cpu_s": cpu1 - cpu0,
                    "cpu_s_per_million": (cpu1 - cpu0) / delivered * 1e6 if delivered else None,
                    "server_cpu_util": (cpu1 - cpu0) / (t1 - t0),
                    "client_cpu_util": (ccpu1 - ccpu0) / (t1 - t0),
                    "machine_busy_cores": (mbusy1 - mbusy0) / (mall1 - mall0) * (os.cpu_count() or 1)
                    if mall1 > mall0 else None}
        finally:
            pub.close()

    def body(server, pool):
        _setup(pool, [(i + 1, (1,)) for i in range(subs)], cfg)
        if cfg["latency_sample"] > 1:
            pool.lazy(cfg["latency_sample"], cfg["latency_lazy_period"])
        result = asyncio.run(drive(server, pool))
        report = pool.report(result["rounds"])
        lat = sorted(report.pop("latency_us"))
        lag = sorted(report.pop("lag_us"))
        if lag:  # the load client's own delay: how late its loops ran a 5 ms timer (all workers)
            result["client_lag_p99_ms"] = lag[int(0.99 * (len(lag) - 1))] / 1000
            result["client_lag_max_ms"] = lag[-1] / 1000
        # Percentiles over every delivery that was due: one not received by the end of the drain
        # counts as infinitely late (reported as None, "undelivered").
        sampled = sum(1 for i in range(subs) if (i // cfg["workers"]) % cfg["latency_sample"] == 0)
        expected = sampled * result.get("publishes", 0)
        result["sampled_connections"] = sampled
        result["samples"] = len(lat)
        result["undelivered"] = max(0, expected - len(lat))
        for key, q in (("p50_ms", 50), ("p99_ms", 99), ("max_ms", 100)):
            k = int(round(q / 100 * (expected - 1))) if expected else 0
            result[key] = lat[k] / 1000 if k < len(lat) else None
        return _finish(result, report)
    return _with_server(name, "latency", cfg, body)


def scenario_memory(name: str, cfg: dict) -> Dict[str, Any]:
    n, warm = cfg["memory_conns"], cfg["memory_warm"]

    def pages(i: int) -> Tuple[int, int]:
        return (1 + i % 1000, 1001 + i % 1000)

    def body(server, pool):
        _setup(pool, [(i + 1, pages(i)) for i in range(warm)], cfg)
        time.sleep(1.0)
        before = server.rss()
        c = _setup(pool, [(warm + i + 1, pages(warm + i)) for i in range(n)], cfg)
        time.sleep(2.0)
        after = server.rss()
        report = pool.report(None)
        result = {"rss_before_mib": before / 2**20, "rss_after_mib": after / 2**20,
                  "kib_per_conn": (after - before) / n / 1024,
                  "setup_conns_per_s": n / (c["t_last"] - c["t0"])}
        return _finish(result, report)
    return _with_server(name, "memory", cfg, body)


def scenario_storm(name: str, cfg: dict) -> Dict[str, Any]:
    n = cfg["storm_conns"]

    def body(server, pool):
        _setup(pool, [(i + 1, ()) for i in range(20)], cfg)  # warm-up: first-connection costs
        pool.prepare([(100 + i, ()) for i in range(n)])
        cpu0, ccpu0 = server.cpu(), pool.cpu()
        c = pool.open_prepared(cfg["concurrency"])
        cpu1, ccpu1 = server.cpu(), pool.cpu()
        wall = c["t_last"] - c["t0"]
        # The load client shares the machine's cores with the server: its own CPU per connect
        # (the worker processes, JWTs made beforehand) is reported beside the server's.
        result = {"connections_ok": c["ok"], "failed": c["failed"], "wall_s": wall,
                  "conns_per_s": c["ok"] / wall if wall else 0.0,
                  "server_cpu_ms_per_conn": (cpu1 - cpu0) / max(1, c["ok"]) * 1000,
                  "client_cpu_ms_per_conn": (ccpu1 - ccpu0) / max(1, c["ok"]) * 1000}
        if c["errors"]:
            result["client_errors"] = c["errors"]
        return result
    return _with_server(name, "storm", cfg, body)


class _Offset:
    """A view of a :class:`ClientPool` whose rounds count from ``base`` (the pool's counts minus
    ``base`` rounds per connection): lets :func:`fixed_rounds` measure one window of many on the
    same connections, with sequence numbers that keep growing."""

    def __init__(self, pool: ClientPool, base: int):
        self.pool, self.base = pool, base

    def minimum(self) -> int:
        return self.pool.minimum() - self.base

    def total(self) -> int:
        return self.pool.total()

    def cpu(self) -> float:
        return self.pool.cpu()


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


async def _windows(pool: ClientPool, server, cfg: dict, rounds: int, make_send, publishes: int) -> Dict[str, Any]:
    """http-pages: ``cfg["http_windows"]`` measured windows of ``rounds`` rounds each on the same
    server and connections (each after its own unmeasured warm-up round). The figures are the
    median window's CPU per delivered message (the windows' spread beside it, ``*_min``/``*_max``),
    so that one burst of another process's work on this shared machine moves the spread, not the
    result. Each window's figures are in ``windows``."""
    count = 1 if cfg.get("profile") else max(1, cfg.get("http_windows", 1))
    results = []
    for w in range(count):
        base = w * (rounds + 1)
        send = make_send(base)
        results.append(await fixed_rounds(_Offset(pool, base), server, cfg, rounds, send,
                                          cfg["http_window"], publishes))
    per_msg = [r["cpu_s_per_million"] for r in results if r.get("cpu_s_per_million")]
    out = dict(results[len(results) // 2])
    if per_msg:
        # the window whose CPU per message is the median stands for the run (msgs/s, cores beside it)
        med = _median(per_msg)
        out = dict(min(results, key=lambda r: abs((r.get("cpu_s_per_million") or 0.0) - med)))
        out["cpu_s_per_million"] = med
        out["cpu_s_per_million_min"], out["cpu_s_per_million_max"] = min(per_msg), max(per_msg)
    out["server_cpu_s_total"] = sum(r["server_cpu_s"] for r in results)
    out["delivered_total"] = sum(r["delivered"] for r in results)
    out["drained"] = all(r.get("drained", True) for r in results)
    out["windows"] = [{k: r.get(k) for k in ("cpu_s_per_million", "server_cpu_s", "delivered", "wall_s",
                                              "msgs_per_s", "machine_busy_cores")} for r in results]
    out["rounds"] = count * (rounds + 1)
    return out


def scenario_http_pages(name: str, cfg: dict) -> Dict[str, Any]:
    """Issue 16 item 1: many pages with one subscriber each, every message published through
    ``POST /api/publish`` in batches spread over the pages (tornado-rt: also through the embedded
    ``publish()``). ``http_windows`` measured windows of ``http_messages`` messages each, the
    median reported (see :func:`_windows`)."""
    n, batch = cfg["http_pages"], cfg["http_batch"]
    rounds = max(1, cfg["http_messages"] // n)
    windows = 1 if cfg.get("profile") else max(1, cfg.get("http_windows", 1))
    tables = list(range(1, n + 1))
    specs = [(i + 1, (i + 1,)) for i in range(n)]
    tornado_rt = name in ("tornado-rt", "tornado-rt-uvloop")

    def http_body(server, pool):
        _setup(pool, specs, cfg)

        async def drive():
            client = await HttpClient(server.http_port).open()

            def make_send(base: int):
                send_round = http_sender(client, tables, batch)

                async def send(seq: int) -> None:
                    await send_round(base + seq)
                return send
            try:
                return await _windows(pool, server, cfg, rounds, make_send, n)
            finally:
                client.close()
        return _finish(asyncio.run(drive()), pool.report(windows * (rounds + 1)))

    def embedded_body(server, pool):
        _setup(pool, specs, cfg)

        async def drive():
            pub = await open_publisher(server.port)

            def make_send(base: int):
                async def send_round(seq: int) -> None:
                    for t0 in range(1, n + 1, batch):
                        pub.send_text(trigger(base + seq, 1, t0, min(batch, n + 1 - t0), large=True))
                return send_round
            try:
                return await _windows(pool, server, cfg, rounds, make_send, n)
            finally:
                pub.close()
        return _finish(asyncio.run(drive()), pool.report(windows * (rounds + 1)))

    result = _with_server(name, "http-pages", cfg, http_body, script=SERVE_SCRIPT if tornado_rt else None)
    if tornado_rt:
        try:
            emb = _with_server(name, "http-pages-embedded", cfg, embedded_body)
        except Exception as exc:
            emb = {"error": f"{type(exc).__name__}: {exc}"}
        result["embedded"] = emb
        result["embedded_cpu_s_per_million"] = emb.get("cpu_s_per_million")
        result["embedded_msgs_per_s"] = emb.get("msgs_per_s")
        result["embedded_lost"] = emb.get("lost")
        if emb.get("drained") is False or emb.get("error"):
            result["embedded_drained"] = False
    return result


def scenario_http_single(name: str, cfg: dict) -> Dict[str, Any]:
    """Issue 16 item 2: ``POST /api/publish`` with one message per request, one request at a time
    on one keep-alive connection, to a page nobody watches; server CPU per request."""
    n, warm = cfg["http_single_requests"], cfg["http_single_warm"]
    server = start_server(name, f"{name}-http-single", cfg["lifetime"],
                          script=SERVE_SCRIPT if name.startswith("tornado-rt") else None)
    body = b'{"message":' + LARGE % (0, time.time_ns() // 1000, 1) + b"}"

    async def drive() -> Dict[str, Any]:
        client = await HttpClient(server.http_port).open()
        try:
            for _ in range(warm):
                await client.publish(body)
            spy = Spy(server, cfg)
            cpu0, pcpu0, t0 = server.cpu(), self_cpu(), time.monotonic()
            for _ in range(n):
                await client.publish(body)
            t1, cpu1, pcpu1 = time.monotonic(), server.cpu(), self_cpu()
            spy.stop()
        finally:
            client.close()
        return {"requests": n, "body_bytes": len(body), "wall_s": t1 - t0, "server_cpu_s": cpu1 - cpu0,
                "requests_per_s": n / (t1 - t0), "cpu_us_per_request": (cpu1 - cpu0) / n * 1e6,
                "server_cpu_util": (cpu1 - cpu0) / (t1 - t0), "publisher_cpu_util": (pcpu1 - pcpu0) / (t1 - t0)}
    try:
        result = asyncio.run(drive())
        result["server_alive"] = server.alive()
        return result
    finally:
        server.stop()


def _redis_median(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """redis-pages' watched windows -> one result: ``a_cpu_us_per_publish`` (the one process for
    ``tornado-rt``), ``b_cpu_us_per_publish``, ``redis_cpu_us_per_publish`` and
    ``cpu_us_per_publish`` (all processes) are each the median over the windows, with
    ``*_min``/``*_max`` beside them; the window whose A figure is the median stands for the rest
    (wall time, cores). Each window's figures are in ``windows``."""
    def per(r: Dict[str, Any]) -> Dict[str, float]:
        by = r.get("cpu_us_per_publish_by_process") or [r["cpu_us_per_publish"]]
        out = {"a_cpu_us_per_publish": by[0], "cpu_us_per_publish": r["cpu_us_per_publish"]}
        if len(by) > 1:
            out["b_cpu_us_per_publish"] = by[1]
        if r.get("redis_cpu_us_per_publish") is not None:
            out["redis_cpu_us_per_publish"] = r["redis_cpu_us_per_publish"]
        if r.get("redis_xread_per_publish") is not None:
            out["redis_xread_per_publish"] = r["redis_xread_per_publish"]
        return out
    figs = [per(r) for r in runs]
    med_a = _median([f["a_cpu_us_per_publish"] for f in figs])
    out = dict(runs[min(range(len(runs)), key=lambda i: abs(figs[i]["a_cpu_us_per_publish"] - med_a))])
    for key in figs[0]:
        values = [f[key] for f in figs]
        out[key] = _median(values)
        out[key + "_min"], out[key + "_max"] = min(values), max(values)
    out["server_cpu_s_total"] = sum(r["server_cpu_s"] for r in runs)
    out["delivered_total"] = sum(r["delivered"] for r in runs)
    out["drained"] = all(r.get("drained", True) for r in runs)
    out["windows"] = [{**f, **{k: r.get(k) for k in ("server_cpu_s", "delivered", "wall_s", "machine_busy_cores",
                                                     "order", "started_at", "ended_at")}}
                      for f, r in zip(figs, runs)]
    out["rounds"] = len(runs) * (runs[0]["rounds"])
    return out


class _RedisPagesSide:
    """One server of redis-pages with its subscribers (its own load-client pool), its HTTP
    publisher connection and the windows measured on it so far."""

    def __init__(self, name: str, server, pool: ClientPool):
        self.name, self.server, self.pool = name, server, pool
        self.client: Optional[HttpClient] = None
        self.runs: List[Dict[str, Any]] = []
        self.idle: Dict[str, Any] = {}


async def _redis_watched_window(side: _RedisPagesSide, cfg: dict, order: int) -> None:
    """One measured window of redis-pages on ``side`` (its own warm-up round first): rounds of one
    publish to each watched page through the HTTP API; appended to ``side.runs`` with its place
    in the run (``order``) and its wall-clock start and end."""
    n, batch = cfg["redis_pages"], cfg["http_batch"]
    rounds = max(1, cfg["redis_messages"] // n)
    base = len(side.runs) * (rounds + 1)  # same connections: the sequence numbers keep growing
    assert side.client is not None
    send_round = http_sender(side.client, list(range(1, n + 1)), batch)

    async def send(seq: int) -> None:
        await send_round(base + seq)
    started = time.time()
    run = await fixed_rounds(_Offset(side.pool, base), side.server, cfg, rounds, send, cfg["http_window"], n)
    run.update(order=order, started_at=started, ended_at=time.time())
    side.runs.append(run)


async def _redis_unwatched(side: _RedisPagesSide, cfg: dict) -> None:
    """redis-pages' last part on ``side``: publishes to pages nobody watches (one window). Under
    --profile only the watched windows are profiled: this part's Spy would write the same file."""
    n = cfg["redis_pages"]
    assert side.client is not None
    side.idle = await fixed_rounds(None, side.server, dict(cfg, profile=False), max(1, cfg["redis_unwatched"] // n),
                                   http_sender(side.client, list(range(n + 1, 2 * n + 1)), cfg["http_batch"]), 0, n)


def _redis_result(side: _RedisPagesSide, cfg: dict) -> Dict[str, Any]:
    """The figures of one redis-pages server: the median of its watched windows, its clients'
    report, then the unwatched part."""
    rounds = max(1, cfg["redis_messages"] // cfg["redis_pages"])
    result = _finish(_redis_median(side.runs), side.pool.report(len(side.runs) * (rounds + 1)))
    idle = side.idle
    idle_by = idle.get("cpu_us_per_publish_by_process") or [idle["cpu_us_per_publish"]]
    result["unwatched_cpu_us_per_publish"] = idle_by[0]
    if len(idle_by) > 1:
        result["unwatched_b_cpu_us_per_publish"] = idle_by[1]
    if "redis_cpu_us_per_publish" in idle:
        result["unwatched_redis_cpu_us_per_publish"] = idle["redis_cpu_us_per_publish"]
    result["unwatched"] = idle
    result["server_alive"] = side.server.alive()
    result.update(event_loops())
    return result


def scenario_redis_pages(name: str, cfg: dict) -> Dict[str, Any]:
    """Issue 16 item 5 (measurement), one server alone: 1,000 pages with one subscriber each, all
    on process A; page messages published through A's HTTP API in batches; CPU per publish of A,
    of B (no subscriber) and of redis-server; then publishes to pages nobody watches.
    ``tornado-rt``: the same in one process without Redis. With both servers in the run,
    :func:`paired_redis_pages` measures them side by side instead."""
    n = cfg["redis_pages"]
    windows = 1 if cfg.get("profile") else max(1, cfg.get("redis_windows", 1))

    def body(server, pool):
        _setup(pool, [(i + 1, (i + 1,)) for i in range(n)], cfg)
        side = _RedisPagesSide(name, server, pool)

        async def drive():
            side.client = await HttpClient(server.http_port).open()
            try:
                for w in range(windows):  # same server and connections; each window has its own warm-up
                    await _redis_watched_window(side, cfg, w)
                await _redis_unwatched(side, cfg)
            finally:
                side.client.close()
        asyncio.run(drive())
        return _redis_result(side, cfg)
    return _with_server(name, "redis-pages", cfg, body, script=SERVE_SCRIPT)


PAIRED = ("tornado-rt", "tornado-rt-redis")


def paired_redis_pages(cfg: dict) -> Dict[str, Dict[str, Any]]:
    """redis-pages for ``tornado-rt`` and ``tornado-rt-redis`` side by side: both started, the
    same pages with one subscriber each on each (on A for Redis mode), then ``redis_windows``
    window pairs measured in turn (one process, Redis mode, one process, ...), each window with
    its own warm-up round; then the unwatched part of each. Both results carry the usual
    figures (medians over their own windows); ``tornado-rt-redis``'s also carries ``pairs``
    (each pair's figures and ratio of A to the one process, in the order measured),
    ``a_ratios`` and their median ``a_ratio_median``, which the target line uses: a burst of
    other work on this shared machine moves one pair, and both windows of a pair see about the
    same machine."""
    n = cfg["redis_pages"]
    count = max(1, cfg.get("redis_windows", 1))
    specs = [(i + 1, (i + 1,)) for i in range(n)]
    sides: List[_RedisPagesSide] = []
    try:
        for name in PAIRED:
            server = start_server(name, f"{name}-redis-pages-paired", cfg["lifetime"], script=SERVE_SCRIPT)
            try:
                pool = ClientPool(cfg["workers"], getattr(server, "ports", [server.port]), lifetime=cfg["lifetime"])
            except BaseException:
                server.stop()
                raise
            sides.append(_RedisPagesSide(name, server, pool))
            _setup(pool, specs, cfg)

        async def drive():
            for side in sides:
                side.client = await HttpClient(side.server.http_port).open()
            try:
                order = 0
                for _ in range(count):
                    for side in sides:
                        await _redis_watched_window(side, cfg, order)
                        order += 1
                for side in sides:
                    await _redis_unwatched(side, cfg)
            finally:
                for side in sides:
                    if side.client is not None:
                        side.client.close()
        asyncio.run(drive())
        results = {side.name: _redis_result(side, cfg) for side in sides}
    finally:
        for side in sides:
            side.pool.stop()
            side.server.stop()
    one, two = sides
    pairs = []
    for o, r in zip(one.runs, two.runs):
        o_us, a_us = o["cpu_us_per_publish"], r["cpu_us_per_publish_by_process"][0]
        pairs.append({"one_process_us": o_us, "a_us": a_us, "b_us": r["cpu_us_per_publish_by_process"][1],
                      "redis_us": r.get("redis_cpu_us_per_publish"), "ratio": a_us / o_us if o_us else None,
                      "one_process_order": o["order"], "redis_order": r["order"],
                      "one_process_started_at": o["started_at"], "one_process_ended_at": o["ended_at"],
                      "redis_started_at": r["started_at"], "redis_ended_at": r["ended_at"],
                      "one_process_machine_busy_cores": o.get("machine_busy_cores"),
                      "redis_machine_busy_cores": r.get("machine_busy_cores")})
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    for name in PAIRED:
        results[name]["paired"] = True
    results["tornado-rt-redis"].update(pairs=pairs, a_ratios=ratios,
                                       a_ratio_median=_median(ratios) if ratios else None,
                                       a_ratio_min=min(ratios) if ratios else None,
                                       a_ratio_max=max(ratios) if ratios else None)
    return results


def scenario_of(key: str) -> str:
    """The scenario a result key belongs to ("fanout-1000" -> "fanout")."""
    return "fanout" if key.startswith("fanout-") else key


def run_scenario(key: str, name: str, cfg: dict) -> Dict[str, Any]:
    if scenario_of(key) not in SUPPORTS[name]:
        return {"skipped": "does not take part in this scenario"}
    if SERVERS[name][0].endswith(".go"):
        try:
            centrifuge_binary()
        except Unavailable as exc:
            return {"skipped": f"unavailable: {exc}"}
    if key.startswith("fanout-"):
        return scenario_fanout(name, int(key.split("-")[1]), cfg)
    return {"latency": scenario_latency, "pages": scenario_pages, "memory": scenario_memory,
            "storm": scenario_storm, "http-pages": scenario_http_pages, "http-single": scenario_http_single,
            "redis-pages": scenario_redis_pages}[key](name, cfg)


# --- reporting -------------------------------------------------------------------------------------
# (scenario key prefix, metric, label, better: "high"/"low"/"zero", format)
METRICS = [
    ("fanout", "msgs_per_s", "delivered msgs/s", "high", "{:,.0f}"),
    ("fanout", "cpu_s_per_million", "server CPU s / 1M msgs", "low", "{:.2f}"),
    ("fanout", "redis_cpu_s_per_million", "Redis CPU s / 1M msgs (not in server CPU)", None, "{:.3f}"),
    ("fanout", "server_cpu_util", "server CPU (cores)", None, "{:.2f}"),
    ("fanout", "client_cpu_util", "load-client CPU (cores)", None, "{:.2f}"),
    ("fanout", "msgs_per_read", "msgs per client socket read", None, "{:.1f}"),
    ("fanout", "lost", "lost", "zero", "{:,}"),
    ("latency", "p50_ms", "p50 latency ms", "low", "{:.1f}"),
    ("latency", "p99_ms", "p99 latency ms", "low", "{:.1f}"),
    ("latency", "max_ms", "max latency ms", "low", "{:.1f}"),
    ("latency", "cpu_s_per_million", "server CPU s / 1M msgs (fixed rate)", "low", "{:.2f}"),
    ("latency", "server_cpu_util", "server CPU (cores)", None, "{:.2f}"),
    ("latency", "client_cpu_util", "load-client CPU (cores)", None, "{:.2f}"),
    ("latency", "lost", "lost", "zero", "{:,}"),
    ("pages", "msgs_per_s", "delivered msgs/s", "high", "{:,.0f}"),
    ("pages", "cpu_s_per_million", "server CPU s / 1M msgs", "low", "{:.2f}"),
    ("pages", "lost", "lost", "zero", "{:,}"),
    ("memory", "kib_per_conn", "RSS KiB / idle connection", "low", "{:.1f}"),
    ("storm", "conns_per_s", "connects/s (JWT + auth message)", "high", "{:,.0f}"),
    ("storm", "server_cpu_ms_per_conn", "server CPU ms / connect", "low", "{:.3f}"),
    ("storm", "client_cpu_ms_per_conn", "load-client CPU ms / connect", None, "{:.3f}"),
    ("http-pages", "cpu_s_per_million", "server CPU µs / delivered msg, POST /api/publish", "low", "{:.1f}"),
    ("http-pages", "cpu_s_per_million_min", "same, lowest window", None, "{:.1f}"),
    ("http-pages", "cpu_s_per_million_max", "same, highest window", None, "{:.1f}"),
    ("http-pages", "embedded_cpu_s_per_million", "server CPU µs / delivered msg, embedded publish()", "low",
     "{:.1f}"),
    ("http-pages", "msgs_per_s", "delivered msgs/s, POST /api/publish (1 request at a time)", "high", "{:,.0f}"),
    ("http-pages", "server_cpu_util", "server CPU (cores)", None, "{:.2f}"),
    ("http-pages", "lost", "lost", "zero", "{:,}"),
    ("http-pages", "embedded_lost", "lost, embedded publish()", "zero", "{:,}"),
    ("http-single", "cpu_us_per_request", "server CPU µs / request", "low", "{:.1f}"),
    ("http-single", "requests_per_s", "requests/s (1 at a time)", "high", "{:,.0f}"),
    ("redis-pages", "a_cpu_us_per_publish", "CPU µs / publish, publishing process A", "low", "{:.1f}"),
    ("redis-pages", "b_cpu_us_per_publish", "CPU µs / publish, process B (no subscriber)", None, "{:.1f}"),
    ("redis-pages", "redis_cpu_us_per_publish", "CPU µs / publish, redis-server", None, "{:.1f}"),
    ("redis-pages", "redis_xread_per_publish", "XREADs / publish, all processes (INFO commandstats)", None, "{:.3f}"),
    ("redis-pages", "unwatched_cpu_us_per_publish", "CPU µs / publish to a page nobody watches, A", "low",
     "{:.1f}"),
    ("redis-pages", "unwatched_b_cpu_us_per_publish", "same, process B", None, "{:.1f}"),
    ("redis-pages", "unwatched_redis_cpu_us_per_publish", "same, redis-server", None, "{:.1f}"),
    ("redis-pages", "lost", "lost", "zero", "{:,}"),
]


def scenario_title(key: str, cfg: dict) -> str:
    if key.startswith("fanout-"):
        return f"fan-out, 1 page x {int(key.split('-')[1]):,} subs"
    return {"latency": f"latency, {cfg['latency_subs']:,} subs @ {cfg['latency_rate']:.0f} pub/s",
            "pages": f"{cfg['pages_conns']:,} pages x 1 sub",
            "memory": f"memory, {cfg['memory_conns']:,} idle conns x 2 pages",
            "storm": f"connect storm, {cfg['storm_conns']:,} conns",
            "http-pages": f"{cfg['http_pages']:,} pages x 1 sub, {cfg['http_messages']:,} msgs in HTTP batches "
                          f"of {cfg['http_batch']}, median of {cfg.get('http_windows', 1)} windows",
            "http-single": f"POST /api/publish, 1 msg/request x {cfg['http_single_requests']:,}",
            "redis-pages": f"{cfg['redis_pages']:,} pages x 1 sub on A, {cfg['redis_messages']:,} HTTP "
                           f"publishes, median of {cfg.get('redis_windows', 1)} windows"}[key]


def markdown(results: Dict[str, Dict[str, Any]], servers: Sequence[str], cfg: dict, meta: dict) -> str:
    base = "tornado-rt"
    head = ["scenario", "metric"] + [SERVERS[s][1] for s in servers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_server in results.items():
        prefix = scenario_of(key)
        for scen, metric, label, better, fmt in METRICS:
            if scen != prefix:
                continue
            if metric.startswith("redis_") and not any(metric in r for r in by_server.values()):
                continue  # Redis rows only when tornado-rt-redis ran
            row = [scenario_title(key, cfg), label]
            ref = by_server.get(base, {}).get(metric)
            for s in servers:
                r = by_server.get(s)
                if r is None:
                    row.append("")
                    continue
                if "error" in r and r.get(metric) is None and metric != "lost":
                    row.append("error")
                    continue
                v = r.get(metric)
                if v is None:
                    row.append("undelivered" if metric.endswith("_ms") and r.get("undelivered") else "n/a")
                    continue
                cell = fmt.format(v)
                if metric == "lost":
                    if r.get("drained") is False:
                        cell += " (not drained)"
                    if r.get("order_errors"):
                        cell += f" ({r['order_errors']:,} out of order)"
                    if r.get("closed"):
                        cell += f" ({r['closed']:,} closed)"
                elif better in ("high", "low") and s != base and isinstance(ref, (int, float)) and ref:
                    cell += f" ({v / ref:.2f}x)"
                row.append(cell)
            lines.append("| " + " | ".join(row) + " |")
    out = ["## tornado-rt benchmark" + (" (quick)" if meta["quick"] else ""), "",
           f"{meta['date']} · {meta['machine']} · Python {meta['python']} · command: `{meta['command']}`", "",
           "\n".join(lines), "",
           "(Nx) = reference ÷ tornado-rt. For msgs/s and connects/s higher is better (a ratio below 1 "
           "means tornado-rt is faster); for CPU, latency and RSS lower is better (a ratio above 1 "
           "means tornado-rt is better).", ""]
    unavailable = {s: r["skipped"] for by_server in results.values() for s, r in by_server.items()
                   if str(r.get("skipped", "")).startswith("unavailable")}
    if unavailable:
        out += ["Unavailable on this machine (n/a above): "
                + "; ".join(f"{SERVERS[s][1]}: {why[len('unavailable: '):]}" for s, why in unavailable.items()), ""]
    out += targets(results, servers)
    out += targets16(results)
    out += redis_cost(results)
    return "\n".join(out) + "\n"


def targets(results: Dict[str, Dict[str, Any]], servers: Sequence[str]) -> List[str]:
    def get(key, server, metric):
        return results.get(key, {}).get(server, {}).get(metric)

    lines = ["Targets of issue 4 (tornado-rt):", ""]
    fan_keys = [k for k in results if k.startswith("fanout-")]
    for key in fan_keys:
        rt = get(key, "tornado-rt", "cpu_s_per_million")
        for ref, limit in (("websockets", 0.5), ("channels", 0.01)):
            other = get(key, ref, "cpu_s_per_million")
            if rt and other:
                ratio = rt / other
                lines.append(f"- {key}: CPU/msg vs {SERVERS[ref][1]} = {ratio:.3f}x (target <= {limit}x): "
                             + ("met" if ratio <= limit else "NOT met"))
    p99 = get("latency", "tornado-rt", "p99_ms")
    floor_p99 = get("latency", "floor", "p99_ms")
    if p99 is not None:
        lines.append(f"- p99 latency = {p99:.1f} ms (target <= 25 ms): " + ("met" if p99 <= 25 else "NOT met")
                     + (f" (the floor in this run: {floor_p99:.1f} ms, tornado-rt {p99 / floor_p99:.2f}x)"
                        if floor_p99 else ""))
    elif "tornado-rt" in results.get("latency", {}):
        lines.append("- p99 latency: more than 1% undelivered (target <= 25 ms): NOT met")
    kib = get("memory", "tornado-rt", "kib_per_conn")
    if kib is not None:
        lines.append(f"- RSS per idle connection = {kib:.1f} KiB (target <= 10 KiB): "
                     + ("met" if kib <= 10 else "NOT met"))
    cps = get("storm", "tornado-rt", "conns_per_s")
    floor_cps = get("storm", "floor", "conns_per_s")
    if cps is not None:
        lines.append(f"- connects/s = {cps:,.0f} (target >= 2,000): " + ("met" if cps >= 2000 else "NOT met")
                     + (f" (the connect floor in this run: {floor_cps:,.0f}/s, tornado-rt {cps / floor_cps:.2f}x)"
                        if floor_cps else ""))
    lost = [f"{k}={v['tornado-rt'].get('lost')}" for k, v in results.items()
            if "tornado-rt" in v and v["tornado-rt"].get("lost")]
    if any(k in results for k in ("latency", "pages")) or fan_keys:
        lines.append("- zero messages lost: " + ("met" if not lost else "NOT met (" + ", ".join(lost) + ")"))
    return lines + [""] if len(lines) > 2 else []


def targets16(results: Dict[str, Dict[str, Any]]) -> List[str]:
    """The measurable targets of issue 16 for tornado-rt (HTTP scenarios), met / NOT met."""
    def get(key, server, metric):
        return results.get(key, {}).get(server, {}).get(metric)

    lines = []
    for rt in ("tornado-rt", "tornado-rt-uvloop"):
        mine, ws = get("http-pages", rt, "cpu_s_per_million"), get("http-pages", "websockets", "cpu_s_per_million")
        if mine and ws:
            lo, hi = get("http-pages", rt, "cpu_s_per_million_min"), get("http-pages", rt, "cpu_s_per_million_max")
            wlo, whi = (get("http-pages", "websockets", "cpu_s_per_million_min"),
                        get("http-pages", "websockets", "cpu_s_per_million_max"))
            spread = (f" (medians of windows; {rt} {lo:.1f}-{hi:.1f} µs, websockets {wlo:.1f}-{whi:.1f} µs)"
                      if lo and hi and wlo and whi else "")
            lines.append(f"- http-pages ({rt}): CPU per delivered msg vs websockets = {mine / ws:.2f}x "
                         "(target <= 1.2x): " + ("met" if mine / ws <= 1.2 else "NOT met") + spread)
        mine, bare = get("http-single", rt, "cpu_us_per_request"), get("http-single", "tornado-bare", "cpu_us_per_request")
        if mine and bare:
            lines.append(f"- http-single ({rt}): CPU per request vs a bare Tornado handler = {mine / bare:.2f}x "
                         "(target <= 1.15x): " + ("met" if mine / bare <= 1.15 else "NOT met"))
    one, two = results.get("redis-pages", {}).get("tornado-rt", {}), results.get("redis-pages", {}).get("tornado-rt-redis", {})

    def spread(r: Dict[str, Any], key: str) -> str:
        lo, hi = r.get(key + "_min"), r.get(key + "_max")
        return f"{lo:.1f}-{hi:.1f} µs" if lo is not None and hi is not None else ""
    if two.get("a_ratio_median") is not None:  # paired windows (paired_redis_pages)
        r, ratios = two["a_ratio_median"], two["a_ratios"]
        lines.append(f"- redis-pages: a publish in Redis mode (A) vs one process = {r:.2f}x, median of "
                     f"{len(ratios)} paired windows (target <= 1.5x): " + ("met" if r <= 1.5 else "NOT met")
                     + " (pairs " + ", ".join(f"{x:.2f}" for x in ratios) + "; medians of windows "
                     f"{two['a_cpu_us_per_publish']:.1f} / {one['a_cpu_us_per_publish']:.1f} µs)")
    elif one.get("a_cpu_us_per_publish") and two.get("a_cpu_us_per_publish"):
        r = two["a_cpu_us_per_publish"] / one["a_cpu_us_per_publish"]
        s1, s2 = spread(one, "a_cpu_us_per_publish"), spread(two, "a_cpu_us_per_publish")
        lines.append(f"- redis-pages: a publish in Redis mode (A) vs one process = {r:.2f}x (target <= 1.5x): "
                     + ("met" if r <= 1.5 else "NOT met")
                     + (f" (medians of windows, {two['a_cpu_us_per_publish']:.1f} / {one['a_cpu_us_per_publish']:.1f} µs;"
                        f" A {s2}, one process {s1})" if s1 and s2 else ""))
    if two.get("redis_cpu_us_per_publish") is not None:
        v, s = two["redis_cpu_us_per_publish"], spread(two, "redis_cpu_us_per_publish")
        lines.append(f"- redis-pages: redis-server {v:.1f} µs per publish (target <= 5 µs): " + ("met" if v <= 5 else "NOT met")
                     + (f" (median; windows {s})" if s else ""))
    if two.get("b_cpu_us_per_publish") is not None:
        v, s = two["b_cpu_us_per_publish"], spread(two, "b_cpu_us_per_publish")
        lines.append(f"- redis-pages: process B (no recipient) {v:.1f} µs per cluster publish (target <= 1 µs): "
                     + ("met" if v <= 1 else "NOT met") + (f" (median; windows {s})" if s else ""))
    return ["Targets of issue 16 (tornado-rt):", ""] + lines + [""] if lines else []


def redis_cost(results: Dict[str, Dict[str, Any]]) -> List[str]:
    """What going through Redis costs per publish (each publish crosses Redis once) and per
    delivered message: tornado-rt-redis (2 processes + Redis) against tornado-rt (1 process)."""
    lines = []
    for key, by_server in results.items():
        one, two = by_server.get("tornado-rt", {}), by_server.get("tornado-rt-redis", {})
        if not (key.startswith("fanout-") and one.get("cpu_s_per_million") and two.get("cpu_s_per_million")
                and two.get("redis_cpu_s") is not None):
            continue
        pub1 = one["server_cpu_s"] / one["measured_rounds"] * 1e6  # µs CPU per publish (fan-out: 1 table)
        pub2 = two["server_cpu_s"] / two["measured_rounds"] * 1e6
        rpub = two["redis_cpu_us_per_publish"]
        total = two["cpu_s_per_million"] + two["redis_cpu_s_per_million"]
        lines.append(f"- {key}: per publish, tornado-rt {pub1:,.0f} µs CPU in 1 process; 2 processes over "
                     f"Redis {pub2:,.0f} µs (+{pub2 - pub1:,.0f} µs, {pub2 / pub1:.2f}x) plus {rpub:,.1f} µs in "
                     f"Redis. Per 1M delivered: {one['cpu_s_per_million']:.2f} -> "
                     f"{two['cpu_s_per_million']:.2f} s (+{two['cpu_s_per_million'] - one['cpu_s_per_million']:.2f}), "
                     f"{total:.2f} s with Redis ({total / one['cpu_s_per_million']:.2f}x).")
    return ["Cost of going through Redis (tornado-rt-redis against tornado-rt):", ""] + lines + [""] if lines else []


def uvloop_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("uvloop") is not None


def event_loops() -> Dict[str, str]:
    """The event loops of this run: ``server_loop`` (tornado-rt's servers: --server-loop, uvloop
    only when installed; the tornado-rt-uvloop server always runs on uvloop), ``client_loop``
    (the load-client workers: uvloop when installed, see wsclient.worker_main) and
    ``publisher_loop`` (this process's publisher: asyncio)."""
    return {"server_loop": SERVER_LOOP["loop"], "client_loop": "uvloop" if uvloop_installed() else "asyncio",
            "publisher_loop": "asyncio", "redis_transport": REDIS_TRANSPORT["transport"]}


def versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("tornado", "ujson", "PyJWT", "websockets", "channels", "daphne", "Django", "Twisted", "autobahn",
                "redis", "hiredis"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# --- profiling -------------------------------------------------------------------------------------
def summarize_profile(raw_path: str, top: int = 25) -> str:
    """Self and inclusive sample shares per function (and the hottest lines) from py-spy's
    collapsed-stack output (``--format raw``)."""
    self_fn: Counter = Counter()
    self_line: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            self_line[_short(frames[-1])] += n
            names = [_function(fr) for fr in frames]
            self_fn[names[-1]] += n
            for name in set(names):
                incl[name] += n
    if not total:
        return "no samples"
    out = [f"{total} samples (on-CPU only; idle waits excluded)", "", "Top self time by function:"]
    out += [f"  {n / total * 100:5.1f}%  {fr}" for fr, n in self_fn.most_common(top)]
    out += ["", "Top inclusive time by function:"]
    out += [f"  {n / total * 100:5.1f}%  {fr}" for fr, n in incl.most_common(top)]
    out += ["", "Hottest lines (self):"]
    out += [f"  {n / total * 100:5.1f}%  {fr}" for fr, n in self_line.most_common(12)]
    return "\n".join(out)


def _short(frame: str) -> str:
    # "name (path/to/file.py:123)" -> "name (file.py:123)"
    name, _, loc = frame.partition(" (")
    if loc:
        path, _, rest = loc.rpartition(":")
        return f"{name} ({os.path.basename(path)}:{rest}"
    return frame


def _function(frame: str) -> str:
    # "name (path/to/file.py:123)" -> "name (file.py)"
    name, _, loc = frame.partition(" (")
    if loc:
        return f"{name} ({os.path.basename(loc.rpartition(':')[0])})"
    return frame


def run_profile(cfg: dict, what: str, subs: int) -> None:
    """Run one scenario against tornado-rt with py-spy sampling the server during the measured
    window; writes the collapsed stacks and a summary next to the results."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        sys.exit("py-spy not found: pip install py-spy (into the same environment)")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    tag = {"fanout": f"fanout-{subs}", "pages": f"pages-{cfg['pages_conns']}",
           "storm": f"storm-{cfg['storm_conns']}"}[what]
    raw = os.path.join(RESULTS_DIR, f"profile-tornado-rt-{tag}.txt")

    def body(server, pool):
        if what == "fanout":
            _setup(pool, [(i + 1, (1,)) for i in range(subs)], cfg)
            drive = lambda: windowed(pool, server, cfg, 1, cfg["batch"], cfg["window"], 1)  # noqa: E731
        elif what == "pages":
            n = cfg["pages_conns"]
            _setup(pool, [(i + 1, (i + 1,)) for i in range(n)], cfg)
            drive = lambda: windowed(pool, server, cfg, n, 1, cfg["pages_window"], cfg["pages_chunk"])  # noqa: E731
        else:
            _setup(pool, [(i + 1, ()) for i in range(20)], cfg)

            async def drive():
                await asyncio.sleep(0)
                c = pool.connect([(100 + i, ()) for i in range(cfg["storm_conns"])], cfg["concurrency"])
                return {"rounds": 0, "conns_per_s": c["ok"] / (c["t_last"] - c["t0"])}
        spy_proc = subprocess.Popen(
            [spy, "record", "--pid", str(server.pid), "--rate", "200", "--nonblocking", "--format", "raw",
             "--output", raw, "--duration", str(int(cfg["duration"]) + 1)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _children.append(_Killable(spy_proc))
        time.sleep(0.5)
        result = asyncio.run(drive())
        try:
            _, err = spy_proc.communicate(timeout=cfg["duration"] + 30)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
            err = b""
        if spy_proc.returncode:
            print("py-spy:", err.decode(errors="replace")[-500:], file=sys.stderr)
        return _finish(result, pool.report(result["rounds"] if what != "storm" else None))

    result = _with_server("tornado-rt", f"profile-{tag}", cfg, body)
    if what == "storm":
        print(f"{tag} under py-spy: {result['conns_per_s']:,.0f} connects/s")
    else:
        print(f"{tag} under py-spy: {result.get('msgs_per_s', 0):,.0f} msgs/s, "
              f"{result.get('cpu_s_per_million') or 0:.2f} CPU s/1M, lost {result.get('lost')}, "
              f"{result.get('msgs_per_read') or 0:.1f} msgs per client read")
    if os.path.exists(raw):
        summary = summarize_profile(raw)
        with open(raw.replace(".txt", "-summary.txt"), "w") as f:
            f.write(summary + "\n")
        print(summary)
        print(f"\ncollapsed stacks: {raw} (flamegraph.pl or speedscope.app read them)")


def profile_http(cfg: dict, what: str, servers: Optional[str]) -> int:
    """``--profile http-pages|http-single|redis-pages``: that scenario for ``--servers`` (default
    tornado-rt) with py-spy on the server (process A for tornado-rt-redis) during each measured
    window; prints the figures and a summary of each profile."""
    if not (shutil.which("py-spy") or os.path.exists(os.path.join(os.path.dirname(sys.executable), "py-spy"))):
        sys.exit("py-spy not found: pip install py-spy (into the same environment)")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    cfg["profile"] = True
    for name in (servers or "tornado-rt").split(","):
        r = run_scenario(what, name.strip(), cfg)
        r["elapsed_s"] = 0.0
        print(f"{what} {name} under py-spy: {_line(what, r)}")
        if r.get("embedded"):
            print(f"  embedded publish(): {_line(what, {**r['embedded'], 'elapsed_s': 0.0})}")
    for raw in cfg.get("profiles", []):
        if os.path.exists(raw):
            summary = summarize_profile(raw)
            with open(raw.replace(".txt", "-summary.txt"), "w") as f:
                f.write(summary + "\n")
            print(f"\n=== {os.path.basename(raw)} (collapsed stacks; summary in *-summary.txt)\n{summary}")
    return 0


class _Killable:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# --- main ------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small numbers for a smoke run (~3-4 min with every server)")
    p.add_argument("--servers", help="comma list of " + ", ".join(SERVERS) + " (default: all; tornado-rt-redis "
                   "only when redis-server and the redis package are installed)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ", ".join(SCENARIOS))
    p.add_argument("--fanout-sizes", help="comma list of subscriber counts for the fan-out scenario")
    p.add_argument("--duration", type=float, help="seconds of publishing per throughput/latency scenario")
    p.add_argument("--batch", type=int, help="messages per publish trigger in the fan-out (default 8)")
    p.add_argument("--latency-sample", type=int,
                   help="latency scenario: every Nth connection reads at once and is timed, the others "
                        "read every 20 ms (default 10; 1 = every connection reads at once)")
    p.add_argument("--latency-rate", type=float,
                   help="latency scenario: publishes per second (default 200), to see how the tail "
                        "depends on how busy the server is")
    p.add_argument("--http-pages", type=int, help="http-pages: pages with one subscriber each (full 2,000)")
    p.add_argument("--http-messages", type=int, help="http-pages: messages per measured window (full 40,000)")
    p.add_argument("--http-windows", type=int, help="http-pages: measured windows, the median reported (default 5)")
    p.add_argument("--http-batch", type=int, help="http-pages, redis-pages: messages per POST (default 100)")
    p.add_argument("--http-requests", type=int, help="http-single: measured requests (full 10,000)")
    p.add_argument("--redis-pages", type=int, help="redis-pages: one-subscriber pages on A (full 1,000)")
    p.add_argument("--redis-messages", type=int, help="redis-pages: messages to them through A (full 100,000)")
    p.add_argument("--redis-windows", type=int,
                   help="redis-pages: measured windows of --redis-messages, the median reported (default 5)")
    p.add_argument("--redis-unwatched", type=int,
                   help="redis-pages: then messages to pages nobody watches (full 20,000)")
    p.add_argument("--server-loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="event loop of tornado-rt's servers (uvloop: when installed, else asyncio with a "
                        "warning; recorded as server_loop in the JSON)")
    p.add_argument("--redis-unix", action="store_true",
                   help="tornado-rt-redis: the processes reach redis-server over a Unix domain socket "
                        "instead of TCP on loopback (recorded as redis_transport in the JSON)")
    p.add_argument("--workers", type=int, default=max(2, min(8, (os.cpu_count() or 2))),
                   help="load-client processes (default: CPU count, at least 2, at most 8)")
    p.add_argument("--profile", nargs="?", const="fanout",
                   choices=("fanout", "pages", "storm", "http-pages", "http-single", "redis-pages"),
                   help="only profile tornado-rt with py-spy during the fan-out (size: first of "
                        "--fanout-sizes, default 1000), the many-pages scenario or the connect storm")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "latest"), help="results path prefix (.json/.md)")
    args = p.parse_args(argv)

    signal.signal(signal.SIGTERM, _on_sigterm)
    wsclient.raise_nofile()
    cfg = dict(QUICK if args.quick else FULL)
    if args.fanout_sizes:
        cfg["fanout_sizes"] = [int(x) for x in args.fanout_sizes.split(",") if x]
    if args.duration:
        cfg["duration"] = args.duration
    if args.batch:
        cfg["batch"] = args.batch
    if args.latency_sample:
        cfg["latency_sample"] = max(1, args.latency_sample)
    if args.latency_rate is not None:
        if not args.latency_rate > 0:
            p.error("--latency-rate: must be positive")
        cfg["latency_rate"] = args.latency_rate
    for opt, key in (("http_pages", "http_pages"), ("http_messages", "http_messages"), ("http_windows", "http_windows"),
                     ("http_batch", "http_batch"),
                     ("http_requests", "http_single_requests"), ("redis_pages", "redis_pages"),
                     ("redis_messages", "redis_messages"), ("redis_unwatched", "redis_unwatched"),
                     ("redis_windows", "redis_windows")):
        if getattr(args, opt):
            cfg[key] = max(1, getattr(args, opt))
    cfg["workers"] = args.workers
    cfg["lifetime"] = 1200.0
    if args.server_loop == "uvloop" and not uvloop_installed():
        print("--server-loop uvloop: uvloop is not installed; the servers run on asyncio", file=sys.stderr)
    SERVER_LOOP["loop"] = "uvloop" if args.server_loop == "uvloop" and uvloop_installed() else "asyncio"
    REDIS_TRANSPORT["transport"] = "unix" if args.redis_unix else "tcp"

    if args.profile in HTTP_SCENARIOS:
        return profile_http(cfg, args.profile, args.servers)
    if args.profile:
        run_profile(cfg, args.profile, cfg["fanout_sizes"][0] if args.fanout_sizes else 1000)
        return 0

    if args.servers:
        servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    else:
        servers = [s for s in SERVERS if s != "tornado-rt-redis" or not _redis_missing()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS:
            p.error(f"unknown server {s!r}")
    for s in scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}")
    if "channels" in servers:
        try:
            import channels  # noqa: F401
            import daphne  # noqa: F401
        except ImportError:
            p.error("the channels reference needs `pip install -r bench/requirements.txt`")
    if "tornado-rt-redis" in servers and _redis_missing():
        p.error("tornado-rt-redis needs " + _redis_missing())

    keys = []
    for s in scenarios:
        keys += [f"fanout-{n}" for n in cfg["fanout_sizes"]] if s == "fanout" else [s]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
            "python": platform.python_version(), "command": " ".join(["python", "bench/run.py"] + list(argv or sys.argv[1:])),
            "versions": versions(), "config": cfg, **event_loops(),
            "loadavg_at_start": os.getloadavg()}
    results: Dict[str, Dict[str, Any]] = {}
    started = time.monotonic()
    try:
        for key in keys:
            results[key] = {}
            if key == "redis-pages" and all(name in servers for name in PAIRED):
                # side by side, in alternating window pairs (paired_redis_pages)
                t = time.monotonic()
                print(f"[{time.monotonic() - started:6.1f}s] {key:<12} {' + '.join(PAIRED)} (paired windows)",
                      flush=True)
                try:
                    paired = paired_redis_pages(cfg)
                except Exception as exc:
                    paired = {name: {"error": f"{type(exc).__name__}: {exc}"} for name in PAIRED}
                for name in PAIRED:
                    paired[name]["elapsed_s"] = time.monotonic() - t
                    print(f"{'':9}{name:<27}", _line(key, paired[name]), flush=True)
            for name in servers:
                if key == "redis-pages" and name in PAIRED and all(n in servers for n in PAIRED):
                    results[key][name] = paired[name]
                    continue
                t = time.monotonic()
                print(f"[{time.monotonic() - started:6.1f}s] {key:<12} {name:<14}", end=" ", flush=True)
                try:
                    r = run_scenario(key, name, cfg)
                except Exception as exc:  # one server failing must not lose the others' numbers
                    r = {"error": f"{type(exc).__name__}: {exc}"}
                r["elapsed_s"] = time.monotonic() - t
                results[key][name] = r
                print(_line(key, r), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; partial results follow", file=sys.stderr)
    finally:
        _cleanup()
    meta["elapsed_s"] = time.monotonic() - started
    meta["loadavg_at_end"] = os.getloadavg()
    text = markdown(results, servers, cfg, meta)
    print()
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2, default=str)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(f"written: {args.out}.json, {args.out}.md")
    return 0


def _redis_missing() -> str:
    """What tornado-rt-redis lacks to run ("" when nothing)."""
    try:
        import redis  # noqa: F401
    except ImportError:
        return "`pip install -e '.[redis]'` (redis-py with hiredis)"
    if not (shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")):
        return "redis-server (Debian package redis-server)"
    return ""


def _line(key: str, r: Dict[str, Any]) -> str:
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    if "error" in r and len(r) <= 2:
        return "ERROR " + r["error"]
    parts = []
    for k, fmt in (("msgs_per_s", "{:,.0f} msg/s"), ("cpu_s_per_million", "{:.2f} CPU s/1M"),
                   ("cpu_s_per_million_min", "windows {:.2f}"), ("cpu_s_per_million_max", "- {:.2f}"),
                   ("embedded_cpu_s_per_million", "embedded {:.2f} CPU s/1M"),
                   ("cpu_us_per_request", "{:.1f} CPU µs/request"), ("requests_per_s", "{:,.0f} req/s"),
                   ("a_cpu_us_per_publish", "A {:.1f} µs/publish"), ("b_cpu_us_per_publish", "B {:.1f} µs/publish"),
                   ("redis_cpu_us_per_publish", "redis {:.1f} µs/publish"),
                   ("unwatched_cpu_us_per_publish", "unwatched {:.1f} µs/publish"),
                   ("a_ratio_median", "A / one process {:.2f}x (median of paired windows)"),
                   ("p50_ms", "p50 {:.1f} ms"), ("p99_ms", "p99 {:.1f} ms"), ("max_ms", "max {:.1f} ms"),
                   ("client_lag_p99_ms", "client loop lag p99 {:.1f} ms"), ("client_lag_max_ms", "max {:.1f} ms"),
                   ("kib_per_conn", "{:.1f} KiB/conn"), ("conns_per_s", "{:,.0f} conn/s"),
                   ("lost", "lost {:,}"), ("server_cpu_util", "server {:.2f} cores"),
                   ("redis_cpu_util", "redis {:.3f} cores"),
                   ("client_cpu_util", "client {:.2f} cores"), ("publisher_cpu_util", "publisher {:.2f}"),
                   ("machine_busy_cores", "machine busy {:.2f} cores")):
        if r.get(k) is not None:
            parts.append(fmt.format(r[k]))
    if r.get("error"):
        parts.append("ERROR " + r["error"])
    if r.get("drained") is False:
        parts.append("NOT DRAINED")
    parts.append(f"({r['elapsed_s']:.0f}s)")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
