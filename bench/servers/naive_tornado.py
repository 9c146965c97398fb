"""Reference (a): a naive Tornado server. Each message is serialized once, then
``write_message`` is called per connection (Tornado frames and writes it for each recipient)."""
from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from tornado.web import Application  # noqa: E402
from tornado.websocket import WebSocketClosedError, WebSocketHandler  # noqa: E402

groups: dict = {}
directory: common.Directory


class CoreHandler(WebSocketHandler):
    def open(self):
        self.pages = set()
        self.user_id = common.decode_token(self.get_query_argument("jwt_token", None))
        if self.user_id is None:
            self.write_message(common.dumps(common.AUTH_FAILED))
            self.close(4001, "authentication failed")
            return
        self.web_socket_id = str(uuid.uuid4())
        self.write_message(common.dumps(common.auth_ok(self.web_socket_id)))

    def on_message(self, raw):
        if self.user_id is None:
            return
        try:
            msg = common.json.loads(raw)
        except ValueError:
            return
        if not isinstance(msg, dict) or msg.get("page") != "table":
            return
        table_id = msg.get("table_id")
        if not directory.can_view_table(self.user_id, table_id):
            return
        group = f"table-{table_id}"
        if group not in self.pages:
            self.pages.add(group)
            groups.setdefault(group, set()).add(self)
        self.write_message(common.dumps(common.page_add(table_id)))

    def on_close(self):
        for group in getattr(self, "pages", ()):
            members = groups.get(group)
            if members is not None:
                members.discard(self)
                if not members:
                    del groups[group]


class Publisher(WebSocketHandler):
    def on_message(self, raw):
        seq, rounds, t0, n, ts = common.parse_trigger(raw)
        for r in range(rounds):
            for table_id in range(t0, t0 + n):
                data = common.dumps(common.rows_updated(table_id, seq + r, ts or time.time_ns() // 1000))
                for conn in list(groups.get(f"table-{table_id}", ())):
                    try:
                        conn.write_message(data)
                    except WebSocketClosedError:
                        pass


async def main() -> None:
    global directory
    args = common.cli(__doc__)
    common.prepare_process(args.lifetime)
    directory = common.Directory(args.users, args.tables)
    app = Application([(r"/ws/core/?", CoreHandler), (common.PUBLISH_PATH, Publisher)],
                      websocket_ping_interval=25, websocket_ping_timeout=20)
    app.listen(args.port, "127.0.0.1", backlog=1024)
    common.mark_ready(args.ready_file, args.port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
