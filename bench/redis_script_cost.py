"""Redis CPU per envelope of the publish script alone (issue 16 item 5): no server, no reader.

Starts its own ``redis-server`` (127.0.0.1, a free port, no persistence), registers page groups
the way servers do (``HELLO_SCRIPT``, ``REGISTER_SCRIPT``) and sends ``--calls`` script calls of
``--batch`` plain page messages (``rows_created`` of about 570 bytes, round-robin over
``--pages`` groups), each call packed as ``RedisBroker``'s writer packs it (``pack_envelopes``,
bytes on demand: a group whose last publish needed no bytes goes without them). Redis's on-CPU
time is read from ``/proc/<pid>/task/*/schedstat`` around the measured calls, after a warm-up;
``INFO commandstats`` says how much of it was inside the script's calls (``evalsha``) and in each
of its inner commands. Each mode uses its own key prefix on the same Redis:

* ``own``: this process registered every group (what ``bench/run.py``'s ``redis-pages`` does with
  all subscribers on process A): each envelope goes to its own inbox as a reference, no bytes.
* ``none``: nobody registered the groups (a page nobody watches): nothing is written.
* ``other``: another process registered them: the bytes go to its inbox.
* ``both``: this process and another one registered them.

    python bench/redis_script_cost.py                          # all modes, 2,000 calls of 100
    python bench/redis_script_cost.py --modes own --calls 5000 --pages 1000
    PYTHONPATH=/path/to/other/checkout python bench/redis_script_cost.py   # another version's script
    python bench/redis_script_cost.py --port 6390 --modes own --calls 100 --repeat 1   # a running Redis
    python bench/redis_script_cost.py --round-trips --calls 5000   # what a round trip costs Redis

It uses the script and the packing of the ``tornado_rt`` it imports, so the same command compares
two checkouts. Not part of ``bench/run.py``: a focused measurement for docs/redis.md.
"""
import argparse
import inspect
import os
import shutil
import socket
import subprocess
import time
from typing import Any, Dict, List

import redis
from redis.connection import Connection


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds of all threads of a process (schedstat: no clock-tick steps)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def rows_created(i: int, table: int) -> dict:
    return {"type": "rows_created", "table_id": table,
            "rows": [{"id": i, "name": "row %d" % i, "notes": "n" * 400, "order": "1.00000000000000000000"}],
            "metadata": {"row_comment_count": 0}, "before_row_id": None}


def run_mode(mode: str, port: int, pid: int, args: argparse.Namespace) -> Dict[str, Any]:
    from tornado_rt import redis_broker as rb
    from tornado_rt.envelope import message_envelope
    from tornado_rt.registry import Registry
    from tornado_rt.server import builtin_plugins

    raw = redis.Redis(port=port)
    prefix = f"cost-{mode}:"
    me, other = "me" + mode, "other" + mode
    ttl = 60_000
    procs = {"own": [me], "none": [], "other": [other], "both": [me, other]}[mode]
    for proc in (me, other):  # both alive (HELLO: the routing key, grace 0: routing on at once)
        raw.eval(rb.HELLO_SCRIPT, 0, prefix, proc, ttl, 0)
    groups = [f"table-{t}" for t in range(1, args.pages + 1)]
    for proc in procs:
        for start in range(0, len(groups), 500):
            pairs: List[str] = []
            for g in groups[start:start + 500]:
                pairs += ["+", g]
            raw.eval(rb.REGISTER_SCRIPT, 0, prefix, proc, *pairs)
    time.sleep(0.01)  # routing starts at the routing key's time (ms)
    registry = Registry(builtin_plugins())
    envelopes = [message_envelope(registry, rows_created(i, 1 + i % args.pages), None, None, None, id=f"id{i}")
                 for i in range(args.batch * 10)]
    conn = Connection(port=port, protocol=2)
    conn.connect()
    conn.send_command("SCRIPT", "LOAD", rb.PUBLISH_SCRIPT)
    assert conn.read_response().decode() == rb.PUBLISH_SHA
    stream = prefix[:-1] + ":stream"
    head = (rb._bulk(b"EVALSHA") + rb._bulk(rb.PUBLISH_SHA.encode()) + rb._bulk(b"1") + rb._bulk(stream.encode())
            + rb._bulk(b"%d" % 10_000) + rb._bulk(b"0-0") + rb._bulk(b"100") + rb._bulk(b"300000")
            + rb._bulk(prefix.encode()) + rb._bulk(me.encode()))
    hints: set = set()
    bulks: Dict[str, Any] = {}
    # the key prefix, for a checkout whose pack_envelopes takes it (lean groups as summary keys' names)
    extra = [prefix] if "key_prefix" in inspect.signature(rb.pack_envelopes).parameters else []
    seqs = iter(range(1, 1 << 62))
    t = raw.time()
    offset = t[0] * 1000 + t[1] / 1000 - time.monotonic() * 1000 - rb.DEADLINE_MARGIN_MS
    codes_seen: Dict[int, int] = {}

    def call(k: int) -> None:
        deadline = time.monotonic() + 2.0
        batch = []
        for j in range(args.batch):
            env = envelopes[(k * args.batch + j) % len(envelopes)]
            batch.append((next(seqs), None, rb._Pending(None, deadline, env)))  # type: ignore[arg-type]
        lean = True
        while batch:
            parts: List[bytes] = []
            packed = rb.pack_envelopes(parts, batch, offset, registry, hints, me, lean, bulks, *extra)
            items, groups_of = packed[0], packed[1]
            nargs = packed[3] if len(packed) > 3 else 4 * len(items)  # this checkout's format, or 4 per envelope
            conn.send_packed_command([b"*%d\r\n" % (10 + nargs) + head + b"".join(parts)])
            reply = conn.read_response()
            if isinstance(reply, Exception):
                raise reply
            codes, resend = rb.read_codes(reply[2:])
            for code in codes:
                codes_seen[code] = codes_seen.get(code, 0) + 1
            for n, g in zip(codes if resend is None else codes[:resend], groups_of):
                if g is not None:
                    if n in (rb.REPLY_NOWHERE_LEAN, rb.REPLY_OWN_LEAN):
                        hints.add(g)
                    elif n:
                        hints.discard(g)
            if resend is None:
                break
            if groups_of[resend] is not None:
                hints.discard(groups_of[resend])
            batch, lean = items[resend:], False

    for k in range(max(20, 2 * args.pages // args.batch + 5)):  # warm-up: hints, inbox mirrors
        call(k)
    codes_seen.clear()
    raw.config_resetstat()
    before = cpu_ns(pid)
    began = time.perf_counter()
    for k in range(args.calls):
        call(k)
    wall = time.perf_counter() - began
    spent = cpu_ns(pid) - before
    stats = raw.info("commandstats")
    conn.disconnect()
    n = max(1, args.calls * args.batch)
    inner = {name[len("cmdstat_"):]: v["usec"] / n for name, v in stats.items()
             if name not in ("cmdstat_evalsha", "cmdstat_info", "cmdstat_config")}
    return {"mode": mode, "envelopes": n, "redis_us_per_envelope": spent / 1e3 / n,
            "evalsha_us_per_envelope": stats.get("cmdstat_evalsha", {}).get("usec", 0) / n,
            "inner_us_per_envelope": inner, "codes": codes_seen, "wall_s": wall}


def round_trips(port: int, pid: int, calls: int) -> None:
    """Redis CPU per command of requests that do almost nothing, one round trip at a time: what a
    call costs Redis before any work (waking up, reading, parsing, replying, going back to sleep)."""
    raw = redis.Redis(port=port)
    trivial = raw.script_load("return 1")
    many = [str(i) for i in range(300)]

    def pipelined() -> None:
        pipe = raw.pipeline(transaction=False)
        for _ in range(10):
            pipe.ping()
        pipe.execute()

    for name, fn, per in (("PING", raw.ping, 1), ("EVALSHA of 'return 1'", lambda: raw.evalsha(trivial, 1, "k"), 1),
                          ("the same with 300 arguments", lambda: raw.evalsha(trivial, 1, "k", *many), 1),
                          ("10 PINGs in one pipeline, per PING", pipelined, 10)):
        for _ in range(max(10, calls // 10)):
            fn()
        before = cpu_ns(pid)
        for _ in range(calls):
            fn()
        print(f"  {name}: Redis CPU {(cpu_ns(pid) - before) / calls / per / 1000:.2f} µs per command")
    raw.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="measured script calls per mode (default 2,000)")
    parser.add_argument("--batch", type=int, default=100, help="envelopes per call (default 100, an HTTP batch)")
    parser.add_argument("--pages", type=int, default=200, help="page groups, round-robin (default 200)")
    parser.add_argument("--modes", default="own,none,other,both", help="comma-separated (default all)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode, the median reported (default 3)")
    parser.add_argument("--port", type=int, default=0,
                        help="use the redis-server already listening on this port of 127.0.0.1 (e.g. one under "
                             "valgrind --tool=callgrind, to count its instructions) instead of starting one; "
                             "its data is flushed")
    parser.add_argument("--round-trips", action="store_true",
                        help="instead: Redis CPU per PING, per EVALSHA of 'return 1' (without and with 300 "
                             "arguments) and per PING of 10 pipelined, --calls of each, one round trip at a time")
    args = parser.parse_args()
    import tornado_rt

    port = args.port or free_port()
    proc: Any = None
    if not args.port:
        proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                 "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        raw = redis.Redis(port=port)
        for _ in range(200 if proc is not None else 1):
            try:
                raw.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        pid = proc.pid if proc is not None else int(raw.info("server")["process_id"])
        if args.round_trips:
            print(f"redis-server {raw.info()['redis_version']}; {args.calls} of each, one round trip at a time")
            round_trips(port, pid, args.calls)
            return
        print(f"tornado_rt from {os.path.dirname(tornado_rt.__file__)}; {raw.info()['redis_version']}; "
              f"{args.calls} calls of {args.batch} envelopes over {args.pages} pages per run, median of {args.repeat}")
        for mode in args.modes.split(","):
            runs = []
            for r in range(args.repeat):
                raw.flushall()
                runs.append(run_mode(mode, port, pid, args))
            runs.sort(key=lambda x: x["redis_us_per_envelope"])
            mid = runs[len(runs) // 2]
            inner = ", ".join(f"{k} {v:.2f}" for k, v in sorted(mid["inner_us_per_envelope"].items(),
                                                                  key=lambda kv: -kv[1]) if v >= 0.005)
            print(f"  {mode:5s}: Redis CPU {mid['redis_us_per_envelope']:.2f} µs per envelope (runs "
                  f"{', '.join('%.2f' % x['redis_us_per_envelope'] for x in runs)}); in EVALSHA "
                  f"{mid['evalsha_us_per_envelope']:.2f}, of it inner commands: {inner or '-'}; codes {mid['codes']}")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
