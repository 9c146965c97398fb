"""Reference (b): the ``websockets`` library (new asyncio implementation) with ``broadcast()``:
each message is serialized and encoded once, then framed and written per connection.

``--http-port``: also serve ``POST /api/publish`` (common.HttpApi, no framework) with tornado-rt's
body: parsed with the stdlib ``json``, then for each envelope the message is serialized once and
``broadcast()`` to the subscribers of its table page (one send per recipient)."""
from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from websockets.asyncio.server import broadcast, serve  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

groups: dict = {}
directory: common.Directory


async def publisher(ws) -> None:
    async for raw in ws:
        seq, rounds, t0, n, ts = common.parse_trigger(raw)
        for r in range(rounds):
            for table_id in range(t0, t0 + n):
                members = groups.get(f"table-{table_id}")
                data = common.dumps(common.rows_updated(table_id, seq + r, ts or time.time_ns() // 1000))
                if members:
                    broadcast(members, data)


def api_publish(method: bytes, path: bytes, body: bytes):
    if method != b"POST" or path != b"/api/publish":
        return 404, b'{"error":"not found","field":null}'
    items = common.json.loads(body)
    if not isinstance(items, list):
        items = [items]
    for envelope in items:
        message = envelope["message"]
        members = groups.get(f"table-{message['table_id']}")
        if members:
            broadcast(members, common.dumps(message))
    return 200, b'{"published":%d}' % len(items)


async def handler(ws) -> None:
    url = urlsplit(ws.request.path)
    if url.path == common.PUBLISH_PATH:
        return await publisher(ws)
    if url.path.rstrip("/") != "/ws/core":
        return await ws.close(1008, "not found")
    user_id = common.decode_token(parse_qs(url.query).get("jwt_token", [None])[0])
    if user_id is None:
        await ws.send(common.dumps(common.AUTH_FAILED))
        return await ws.close(4001, "authentication failed")
    await ws.send(common.dumps(common.auth_ok(str(uuid.uuid4()))))
    pages = set()
    try:
        async for raw in ws:
            try:
                msg = common.json.loads(raw)
            except ValueError:
                continue
            if not isinstance(msg, dict) or msg.get("page") != "table":
                continue
            table_id = msg.get("table_id")
            if not directory.can_view_table(user_id, table_id):
                continue
            group = f"table-{table_id}"
            if group not in pages:
                pages.add(group)
                groups.setdefault(group, set()).add(ws)
            await ws.send(common.dumps(common.page_add(table_id)))
    except ConnectionClosed:
        pass
    finally:
        for group in pages:
            members = groups.get(group)
            if members is not None:
                members.discard(ws)
                if not members:
                    del groups[group]


async def main() -> None:
    global directory
    args = common.cli(__doc__)
    common.prepare_process(args.lifetime)
    directory = common.Directory(args.users, args.tables)
    async with serve(handler, "127.0.0.1", args.port, backlog=1024, compression=None,
                     ping_interval=25, ping_timeout=20, max_size=64 * 1024):
        if args.http_port:
            await asyncio.get_running_loop().create_server(
                lambda: common.HttpApi(api_publish), "127.0.0.1", args.http_port, backlog=128)
        common.mark_ready(args.ready_file, args.port)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
