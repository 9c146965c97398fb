"""A small, existing-style Tornado application with tornado-rt mounted in it.

Run it (no configuration needed; it prints what it uses):

    python examples/app.py            # http://127.0.0.1:8080/

What it shows:
* ``POST /api/login`` ``{"user_id": 1}`` issues a Baserow-style access JWT (HS256, ``exp``,
  ``token_type: access``) — a real app would check a password first.
* ``GET/POST /api/tables/{id}/rows``, ``PATCH/DELETE /api/tables/{id}/rows/{row_id}``: a REST API
  over an in-memory table that publishes ``rows_created`` / ``rows_updated`` / ``rows_deleted``
  to the table page, skipping the caller's own connection (the ``WebSocketId`` header).
* ``/ws/core/?jwt_token=...``: the Baserow-compatible WebSocket endpoint.
* ``/``: a tiny page that logs in, subscribes to table 1 and shows live row events.

Environment: ``EXAMPLE_PORT`` (default 8080), ``EXAMPLE_JWT_SECRET`` (default: random per run).
"""
import asyncio
import os
import secrets
import sys
import time

import jwt
import tornado.web
import ujson

from tornado_rt import RealtimeServer, Settings, web_socket_id_from_request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard_plugin"))
from tornado_rt_dashboard import plugin as dashboard_plugin  # noqa: E402  (example plugin)


class Rows:
    """The application's data: tables of rows, in memory."""

    def __init__(self):
        self.tables = {1: {}, 2: {}}
        self.next_id = 1

    def create(self, table_id, values):
        row = {"id": self.next_id, "order": f"{self.next_id}.00000000000000000000", **values}
        self.tables[table_id][row["id"]] = row
        self.next_id += 1
        return row


class BaseHandler(tornado.web.RequestHandler):
    def initialize(self, rt, rows, secret):
        self.rt, self.rows, self.secret = rt, rows, secret

    def json_body(self):
        try:
            body = ujson.loads(self.request.body or b"{}")
        except ValueError:
            raise tornado.web.HTTPError(400, reason="body is not JSON")
        if not isinstance(body, dict):
            raise tornado.web.HTTPError(400, reason="body must be a JSON object")
        return body

    def table(self, table_id):
        table = self.rows.tables.get(int(table_id))
        if table is None:
            raise tornado.web.HTTPError(404, reason="no such table")
        return int(table_id), table

    def write_error(self, status_code, **kwargs):
        self.finish({"error": self._reason, "field": None})


class LoginHandler(BaseHandler):
    def post(self):
        user_id = self.json_body().get("user_id")
        if not isinstance(user_id, int):
            raise tornado.web.HTTPError(400, reason="user_id must be an integer")
        claims = {"user_id": user_id, "token_type": "access", "exp": int(time.time()) + 3600}
        self.write({"access_token": jwt.encode(claims, self.secret, algorithm="HS256")})


class RowsHandler(BaseHandler):
    def get(self, table_id):
        _, table = self.table(table_id)
        self.write({"results": list(table.values())})

    def post(self, table_id):
        table_id, _ = self.table(table_id)
        row = self.rows.create(table_id, self.json_body())
        self.rt.publish({"type": "rows_created", "table_id": table_id, "rows": [row],
                         "metadata": {}, "before_row_id": None},
                        ignore_web_socket_id=web_socket_id_from_request(self))
        self.write(row)


class RowHandler(BaseHandler):
    def row(self, table_id, row_id):
        table_id, table = self.table(table_id)
        row = table.get(int(row_id))
        if row is None:
            raise tornado.web.HTTPError(404, reason="no such row")
        return table_id, table, row

    def patch(self, table_id, row_id):
        table_id, _, row = self.row(table_id, row_id)
        before = dict(row)
        changes = self.json_body()
        row.update({k: v for k, v in changes.items() if k not in ("id", "order")})
        self.rt.publish({"type": "rows_updated", "table_id": table_id, "rows_before_update": [before],
                         "rows": [row], "metadata": {}, "updated_field_ids": sorted(changes)},
                        ignore_web_socket_id=web_socket_id_from_request(self))
        self.write(row)

    def delete(self, table_id, row_id):
        table_id, table, row = self.row(table_id, row_id)
        del table[row["id"]]
        self.rt.publish({"type": "rows_deleted", "table_id": table_id, "row_ids": [row["id"]], "rows": [row]},
                        ignore_web_socket_id=web_socket_id_from_request(self))
        self.set_status(204)


PAGE = """<!doctype html><meta charset=utf-8><title>tornado-rt example</title>
<h1>tornado-rt example</h1><p>User <input id=u value=1 size=3> <button id=go>connect</button>
<button id=add>add a row</button></p><pre id=log></pre>
<script>
let ws, wsid, token;
const log = m => document.getElementById('log').textContent += m + '\\n';
document.getElementById('go').onclick = async () => {
  const r = await fetch('/api/login', {method: 'POST', body: JSON.stringify({user_id: +u.value})});
  token = (await r.json()).access_token;
  ws = new WebSocket(`ws://${location.host}/ws/core/?jwt_token=${token}`);
  ws.onmessage = e => { const m = JSON.parse(e.data); if (m.type === 'authentication') {
      wsid = m.web_socket_id; ws.send(JSON.stringify({page: 'table', table_id: 1})); } log(e.data); };
};
document.getElementById('add').onclick = () => fetch('/api/tables/1/rows',
  {method: 'POST', headers: {WebSocketId: wsid}, body: JSON.stringify({name: 'row ' + Date.now()})});
</script>"""


class PageHandler(tornado.web.RequestHandler):
    def get(self):
        self.write(PAGE)


def make_app(secret, rt=None, rows=None):
    """The application: its own routes plus tornado-rt's WebSocket endpoint."""
    if rt is None:
        rt = RealtimeServer(Settings(jwt_secret=secret), plugins=[dashboard_plugin])
        rt.directory.set_workspace(1, [1, 2, 3])   # users 1-3 work in workspace 1 ...
        rt.directory.set_table(1, 1)               # ... which holds tables 1 and 2
        rt.directory.set_table(2, 1)
    rows = rows or Rows()
    deps = {"rt": rt, "rows": rows, "secret": secret}
    return tornado.web.Application([
        (r"/", PageHandler),
        (r"/api/login", LoginHandler, deps),
        (r"/api/tables/(\d+)/rows", RowsHandler, deps),
        (r"/api/tables/(\d+)/rows/(\d+)", RowHandler, deps),
        *rt.routes(),
    ]), rt


async def main():
    port = int(os.environ.get("EXAMPLE_PORT", "8080"))
    secret = os.environ.get("EXAMPLE_JWT_SECRET") or secrets.token_urlsafe(32)
    app, rt = make_app(secret)
    await rt.start()
    app.listen(port, "127.0.0.1")
    print(f"example app on http://127.0.0.1:{port}/  (WebSocket ws://127.0.0.1:{port}/ws/core/)", flush=True)
    print(f"JWT secret for this run: {secret}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
