"""tornado-rt under test: a RealtimeServer with a directory (workspace 1: users, tables) and the
benchmark publish trigger (see common.py). Publishing goes through the public
``RealtimeServer.publish()`` API with the message type's default audience (page table).
``--broker redis://...``: use a RedisBroker on that Redis instead of the in-process broker (the
``tornado-rt-redis`` variant runs two of these on one Redis). ``--uvloop``: run on uvloop's
event loop (its policy installed before ``asyncio.run``; Tornado runs on asyncio). A trigger
with ``"large":1`` publishes common.rows_updated_large (the ``http-pages`` embedded variant)."""
from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import common  # noqa: E402
from tornado.websocket import WebSocketHandler  # noqa: E402

from tornado_rt import RealtimeServer, Settings, listen, tune_gc  # noqa: E402


def build(users: int, tables: int, broker_url: Optional[str] = None) -> RealtimeServer:
    broker = None
    if broker_url:
        from tornado_rt.redis_broker import RedisBroker
        broker = RedisBroker(broker_url)
    server = RealtimeServer(Settings(jwt_secret=common.SECRET), load_entry_points=False, broker=broker)
    directory = server.directory
    directory.set_workspace(1, range(1, users + 1))
    for table_id in range(1, tables + 1):
        directory.set_table(table_id, 1)
    return server


def publisher_handler(server: RealtimeServer):
    publish = server.publish
    now = time.time_ns

    class Publisher(WebSocketHandler):
        def on_message(self, raw):
            seq, rounds, t0, n, ts = common.parse_trigger(raw)
            message = common.rows_updated_large if '"large":1' in raw else common.rows_updated
            for r in range(rounds):
                for table_id in range(t0, t0 + n):
                    publish(message(table_id, seq + r, ts or now() // 1000))

    return Publisher


async def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--broker", help="redis://host:port/db: publish through a RedisBroker (default: in-process)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (set before the loop starts)")
    parser.add_argument("--plain-listen", action="store_true",
                        help="listen with Tornado's app.listen instead of tornado_rt.listen (what `serve` runs)")
    args = parser.parse_args()
    common.prepare_process(args.lifetime)
    server = build(args.users, args.tables, args.broker)
    app = server.make_app(extra_routes=[(common.PUBLISH_PATH, publisher_handler(server))])
    # Listen the way `tornado-rt serve` does (cli.serve): the guarded server with the settings'
    # header/idle/body timeouts, the per-address cap and its own accept loop, headers up to 160 KiB.
    # ``--plain-listen``: Tornado's own ``app.listen`` instead, to measure what the guard costs.
    if args.plain_listen:
        app.listen(args.port, "127.0.0.1", backlog=1024)
    else:
        listen(app, args.port, "127.0.0.1", settings=server.settings, backlog=1024, max_header_size=160 * 1024)
    await server.start()
    tune_gc()  # what `tornado-rt serve` does at start (README: Performance)
    common.mark_ready(args.ready_file, args.port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        print(f"event loop: uvloop {uvloop.__version__}", flush=True)
    asyncio.run(main())
