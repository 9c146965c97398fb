"""Cost of the Redis bus per envelope: Redis CPU per publish, process CPU per envelope, Redis
memory per retained entry, and how long a publish waits while Redis is stalled (SIGSTOP).

Runs the ``RedisBroker`` that ``tornado_rt`` resolves to, against its own ``redis-server``
(no persistence, 127.0.0.1, a free port). One process publishes ``--n`` page envelopes of about
570 bytes (``rows_created`` to a table nobody watches), ``--batch`` at a time (like an HTTP batch),
each batch handed to the broker at once and awaited, and reads them back (its own echo, as every process does). CPU is read from
/proc (Redis) and ``time.process_time`` (this process) around the publishing only.

    python bench/redis_bus_cost.py --n 50000 --batch 100           # this checkout (Streams)
    python bench/redis_bus_cost.py --n 50000 --batch 100 --registered   # the page registered here
    python bench/redis_bus_cost.py --n 30000 --batch 100 --elsewhere --pages 100  # another process's pages
    python bench/redis_bus_cost.py --registered --pages 200 --directory 20000 --commandstats
        # with a directory load envelope on the control stream (as the bench servers have), and
        # every command of INFO commandstats (the script's inner calls too)
    PYTHONPATH=/path/to/old/checkout python bench/redis_bus_cost.py  # e.g. the pub/sub broker

Not part of ``bench/run.py``: a focused measurement for docs/redis.md.
"""
import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rows_created(i: int, pages: int = 1) -> dict:
    return {"type": "rows_created", "table_id": 10 + i % pages, "rows": [{"id": i, "name": "row %d" % i, "notes": "n" * 400,
                                                               "order": "1.00000000000000000000"}],
            "metadata": {"row_comment_count": 0}, "before_row_id": None}


async def run(args: argparse.Namespace) -> None:
    from tornado_rt import RealtimeServer, Settings
    from tornado_rt.envelope import message_envelope
    from tornado_rt.redis_broker import RedisBroker

    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        raw = redis.Redis(port=port)
        for _ in range(200):
            try:
                raw.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        url = f"redis://127.0.0.1:{port}/0"
        server = RealtimeServer(Settings(jwt_secret="x" * 32, ping_interval=0, history_size=args.history_size),
                                load_entry_points=False, broker=RedisBroker(url))
        await server.start()
        groups = [f"table-{10 + p}" for p in range(args.pages)]
        if args.watched and server.history is not None:
            for group in groups:
                await server.history.position(group)  # what a subscriber with positions=1 does
        broker = server.broker
        if args.registered and hasattr(broker, "register"):
            # What the first subscriber of the page on this process does (routing, issue 16): its
            # messages come to this process's inbox and are read back.
            for group in groups:
                waiting = broker.register(group)
                if waiting is not None:
                    await waiting
                server.hub.groups.setdefault(group, set())  # a (silent) subscriber keeps it registered
        if args.elsewhere:
            # Another (silent) process registered the pages: their messages go to its inbox, bytes
            # and all (nobody reads it here; the script trims it like any inbox).
            from tornado_rt.redis_broker import REGISTER_SCRIPT

            for group in groups:  # as that process's registrar does (the hash and its summary key)
                raw.eval(REGISTER_SCRIPT, 0, "tornado-rt:", "elsewhere", "+", group)
        if args.directory:
            # What a server with a directory loaded does (the bench's serve has 20,000 users and
            # tables): its load envelope is the last entry of the control stream.
            await server.change_directory("load", {"workspaces": {"1": list(range(1, args.directory + 1))},
                                                    "tables": {str(t): 1 for t in range(1, args.directory + 1)}})
        registry = server.registry
        size = len(message_envelope(registry, rows_created(0)).data)
        envelopes = [message_envelope(registry, rows_created(i, args.pages)) for i in range(args.n)]
        memory_before = raw.info("memory")["used_memory"]

        async def publish(batch):
            # Straight to the broker, all of a batch before waiting: the bus's own cost, whatever
            # server.submit does (the old one waited for each envelope in turn).
            await asyncio.gather(*[broker.publish(env) for env in batch])

        await publish(envelopes[:args.batch])  # warm up (connections, script)
        raw.config_resetstat()
        redis_cpu, cpu, wall = proc_cpu(proc.pid), time.process_time(), time.perf_counter()
        for start in range(0, args.n, args.batch):
            await publish(envelopes[start:start + args.batch])
        redis_cpu = proc_cpu(proc.pid) - redis_cpu
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        memory = raw.info("memory")["used_memory"] - memory_before
        stats = raw.info("commandstats")
        inbox = getattr(broker, "inbox", None)
        kind = ("stream" if raw.exists("tornado-rt:stream") or raw.exists("tornado-rt:routing")
                or (inbox and raw.exists(inbox)) else "pub/sub")
        print(f"bus: {kind}; {args.n} envelopes of {size} bytes of message text, batches of {args.batch}; "
              f"history_size {args.history_size}{', page watched with positions' if args.watched else ''}"
              f"{', page registered by this process (routed to its inbox)' if args.registered else ''}"
              f"{', page registered by another process (routed to its inbox)' if args.elsewhere else ''}"
              f"; {args.pages} page(s)"
              f"{f'; a directory of {args.directory} users and tables loaded' if args.directory else ''}")
        print(f"  Redis CPU per publish:   {redis_cpu / args.n * 1e6:7.2f} us (/proc)")
        for name in sorted(n[len("cmdstat_"):] for n in stats) if args.commandstats else ("evalsha", "xread", "publish"):
            stat = stats.get(f"cmdstat_{name}")
            if stat:
                print(f"    {name:8s} {stat['usec'] / args.n:6.2f} us per publish ({stat['calls']} calls, "
                      f"{stat['usec_per_call']:.1f} us per call; INFO commandstats)")
        print(f"  process CPU per envelope: {cpu / args.n * 1e6:7.2f} us (publish + read back + route to nobody)")
        print(f"  throughput:              {args.n / wall:9.0f} envelopes/s")
        key = inbox if args.registered and inbox else "tornado-rt:stream"
        length = raw.xlen(key) if raw.exists(key) else 0
        if kind == "stream" and not length:
            print("  Redis memory:            nothing retained (no process registered the page: no entry)")
        elif kind == "stream":
            print(f"  Redis memory:            {memory / max(1, length):7.0f} bytes per retained entry "
                  f"({length} entries)")

        # Publishes while Redis is stopped: how long until each is refused.
        proc.send_signal(signal.SIGSTOP)
        waits = []
        try:
            for i in range(3):
                started = time.perf_counter()
                try:
                    await server.submit([message_envelope(registry, rows_created(i))])
                    outcome = "accepted"
                except Exception as exc:
                    outcome = type(exc).__name__
                waits.append(f"{time.perf_counter() - started:.2f} s ({outcome})")
        finally:
            proc.send_signal(signal.SIGCONT)
        print(f"  publishes during a Redis stall (SIGSTOP) answered after: {', '.join(waits)}")
        await server.broker.close()
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="envelopes to publish (default 50,000)")
    parser.add_argument("--batch", type=int, default=100, help="envelopes per awaited batch (default 100)")
    parser.add_argument("--history-size", type=int, default=100,
                        help="the recovery extension's history per page (default 100, the setting's "
                             "default; 0: off) to compare the cost of keeping it in Redis")
    parser.add_argument("--registered", action="store_true",
                        help="this process registers the page (as its first subscriber would): the "
                             "messages go to its inbox and are read back (else nobody receives them)")
    parser.add_argument("--elsewhere", action="store_true",
                        help="another process registered the page(s): the messages go to its inbox "
                             "(with --registered: to both)")
    parser.add_argument("--pages", type=int, default=1,
                        help="spread the publishes round-robin over this many pages (default 1)")
    parser.add_argument("--watched", action="store_true",
                        help="a connection with positions=1 watches the page: its history is kept "
                             "(else the page costs one HGET per publish)")
    parser.add_argument("--directory", type=int, default=0,
                        help="first load a directory of N users and N tables (its envelope is then the "
                             "control stream's last entry, as in bench/run.py's servers: 20,000)")
    parser.add_argument("--commandstats", action="store_true",
                        help="print every command of INFO commandstats (scripts' inner calls too)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
