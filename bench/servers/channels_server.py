"""Reference (c): Django Channels with ``InMemoryChannelLayer`` under daphne — the stack Baserow
uses. The consumer follows Baserow's ``CoreConsumer`` (``baserow/ws/consumers.py``): an
``AsyncJsonWebsocketConsumer`` that joins the ``users`` group on connect, ``group_add``s the page's
group on ``page``, and whose ``broadcast_to_group`` handler does ``send_json(payload)`` per
recipient. Publishing is ``channel_layer.group_send(group, {"type": "broadcast_to_group", ...})``
as Baserow's ``broadcast_to_channel_group`` task does.

Differences from Baserow, all in Channels' favour: the JWT is checked with pyjwt in ``connect``
(Baserow's middleware also loads the user from the database), the access check is an in-memory
lookup (Baserow runs ``can_add`` through ``database_sync_to_async``), and JSON is encoded with
compact separators so every server sends byte-identical payloads.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from urllib.parse import parse_qs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import daphne.server  # noqa: E402,F401  (installs the asyncio Twisted reactor first)
import common  # noqa: E402
import django  # noqa: E402
from django.conf import settings  # noqa: E402

settings.configure(
    DEBUG=False, SECRET_KEY="bench", ALLOWED_HOSTS=["*"], USE_TZ=True,
    INSTALLED_APPS=["channels"],
    CHANNEL_LAYERS={"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}},
)
django.setup()

from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

directory: common.Directory = None  # set in main()


class CoreConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        await self.accept()
        query = parse_qs(self.scope["query_string"].decode("latin-1"))
        self.user_id = common.decode_token(query.get("jwt_token", [None])[0])
        self.web_socket_id = str(uuid.uuid4()) if self.user_id is not None else None
        self.pages = set()
        await self.send_json({"type": "authentication", "success": self.user_id is not None,
                              "web_socket_id": self.web_socket_id})
        if self.user_id is None:
            await self.close(code=4001)
            return
        await self.channel_layer.group_add("users", self.channel_name)

    async def receive_json(self, content, **kwargs):
        if self.user_id is None or not isinstance(content, dict) or content.get("page") != "table":
            return
        table_id = content.get("table_id")
        if not directory.can_view_table(self.user_id, table_id):
            return
        group = f"table-{table_id}"
        await self.channel_layer.group_add(group, self.channel_name)
        self.pages.add(group)
        await self.send_json(common.page_add(table_id))

    async def broadcast_to_group(self, event):
        payload = event["payload"]
        ignore_web_socket_id = event["ignore_web_socket_id"]
        if not ignore_web_socket_id or ignore_web_socket_id != self.web_socket_id:
            await self.send_json(payload)

    async def disconnect(self, code):
        for group in getattr(self, "pages", ()):
            await self.channel_layer.group_discard(group, self.channel_name)
        await self.channel_layer.group_discard("users", self.channel_name)

    @classmethod
    async def encode_json(cls, content):
        return common.dumps(content)


class PublishConsumer(AsyncWebsocketConsumer):
    async def receive(self, text_data=None, bytes_data=None):
        seq, rounds, t0, n, ts = common.parse_trigger(text_data)
        group_send = self.channel_layer.group_send
        for r in range(rounds):
            for table_id in range(t0, t0 + n):
                await group_send(f"table-{table_id}", {
                    "type": "broadcast_to_group",
                    "payload": common.rows_updated(table_id, seq + r, ts or time.time_ns() // 1000),
                    "ignore_web_socket_id": None,
                })


application = ProtocolTypeRouter({
    "websocket": URLRouter([
        re_path(r"^ws/core/", CoreConsumer.as_asgi()),
        re_path(r"^bench/publish$", PublishConsumer.as_asgi()),
    ]),
})


def main() -> None:
    global directory
    args = common.cli("Django Channels + InMemoryChannelLayer under daphne")
    common.prepare_process(args.lifetime)
    directory = common.Directory(args.users, args.tables)
    server = daphne.server.Server(
        application=application,
        endpoints=[f"tcp:port={args.port}:interface=127.0.0.1:backlog=1024"],
        ping_interval=25, ping_timeout=20, verbosity=0,
        ready_callable=lambda: common.mark_ready(args.ready_file, args.port),
    )
    server.run()


if __name__ == "__main__":
    main()
