"""A small collaborative table: a Tornado application with tornado-rt mounted in it.

Run it (no configuration needed; it prints its address and what it uses):

    python examples/app.py            # then open http://127.0.0.1:8080/ in two browsers

Sign in by picking a name (the app issues the JWT), add, edit and delete rows; every other
browser viewing the table sees each change live. What it shows:

* ``POST /api/login`` ``{"name": "alice"}`` creates the user if needed and issues a Baserow-style
  access JWT (HS256, ``exp``, ``token_type: access``) — a real app would check a password first.
* ``GET/POST /api/tables/{id}/rows``, ``PATCH/DELETE /api/tables/{id}/rows/{row_id}``
  (``Authorization: JWT <token>``): a REST API over SQLite (the standard library's ``sqlite3``)
  that publishes ``rows_created`` / ``rows_updated`` / ``rows_deleted`` to the table page,
  skipping the caller's own connection (its ``WebSocketId`` header): the page applies its own
  change from the REST answer, everybody else from the message.
* ``GET /api/users``: the signed-in users' names. Who is viewing the table comes from
  tornado-rt's presence extension (the page asks ``{"presence": "table", "table_id": 1}`` after
  subscribing and follows ``presence_joined`` / ``presence_left``), which gives user ids: the page
  names them from this list.
* ``/ws/core/?jwt_token=...``: the Baserow-compatible WebSocket endpoint.
* ``/``: the page (plain HTML, CSS and an ES module in ``examples/static/``, no build step) and
  ``/client/tornado-rt.js``: the project's browser client, which reconnects with backoff and
  subscribes again. The page connects with ``positions=1`` (the recovery extension): after a
  drop it subscribes with ``since`` and receives the changes it missed; when they are no longer
  held (``recovered: false``, e.g. this process restarted) it refetches the rows.

Environment: ``EXAMPLE_PORT`` (default 8080; 0 picks a free port), ``EXAMPLE_HOST`` (default
127.0.0.1), ``EXAMPLE_JWT_SECRET`` (default: random per run), ``EXAMPLE_DATA_DIR`` (where the
SQLite file lives; default a new temporary directory).
"""
import asyncio
import os
import secrets
import sqlite3
import sys
import tempfile
import time

import jwt
import tornado.httpserver
import tornado.web
import ujson

import tornado_rt
from tornado_rt import RealtimeServer, Settings, web_socket_id_from_request

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, "static")
#: The project's browser client module (package data of tornado_rt).
CLIENT_JS = os.path.join(os.path.dirname(os.path.abspath(tornado_rt.__file__)), "static", "tornado-rt.js")

sys.path.insert(0, os.path.join(HERE, "dashboard_plugin"))
from tornado_rt_dashboard import plugin as dashboard_plugin  # noqa: E402  (example plugin)

COLUMNS = ("name", "status", "notes")
STATUSES = ("todo", "doing", "done")
WORKSPACE = 1
TABLES = {1: "Tasks", 2: "Ideas"}


class Store:
    """The application's data in SQLite: users and the rows of its tables."""

    def __init__(self, path=":memory:"):
        self.db = sqlite3.connect(path)
        self.db.row_factory = sqlite3.Row
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
            CREATE TABLE IF NOT EXISTS rows (
                id INTEGER PRIMARY KEY, table_id INTEGER NOT NULL, name TEXT NOT NULL DEFAULT '',
                status TEXT NOT NULL DEFAULT 'todo', notes TEXT NOT NULL DEFAULT '',
                updated_by TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL DEFAULT 0);
        """)
        self.db.commit()

    def user(self, name):
        """The id of the user called ``name``, created on first sign-in."""
        self.db.execute("INSERT OR IGNORE INTO users (name) VALUES (?)", (name,))
        self.db.commit()
        return self.db.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()["id"]

    def all_users(self):
        return [dict(r) for r in self.db.execute("SELECT id, name FROM users ORDER BY id")]

    @staticmethod
    def _row(r):
        row = dict(r)
        del row["table_id"]
        row["order"] = f"{row['id']}.00000000000000000000"
        return row

    def rows(self, table_id):
        found = self.db.execute("SELECT * FROM rows WHERE table_id = ? ORDER BY id", (table_id,))
        return [self._row(r) for r in found]

    def get(self, table_id, row_id):
        r = self.db.execute("SELECT * FROM rows WHERE table_id = ? AND id = ?", (table_id, row_id)).fetchone()
        return self._row(r) if r is not None else None

    def create(self, table_id, values, by):
        cur = self.db.execute(
            "INSERT INTO rows (table_id, name, status, notes, updated_by, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (table_id, values.get("name", ""), values.get("status", "todo"), values.get("notes", ""), by, time.time()))
        self.db.commit()
        return self.get(table_id, cur.lastrowid)

    def update(self, table_id, row_id, values, by):
        sets = ", ".join(f"{k} = ?" for k in values)
        self.db.execute(f"UPDATE rows SET {sets}, updated_by = ?, updated_at = ? WHERE table_id = ? AND id = ?",
                        (*values.values(), by, time.time(), table_id, row_id))
        self.db.commit()
        return self.get(table_id, row_id)

    def delete(self, table_id, row_id):
        self.db.execute("DELETE FROM rows WHERE table_id = ? AND id = ?", (table_id, row_id))
        self.db.commit()


class Refused(tornado.web.HTTPError):
    """A client error answered as ``{"error": "<field>: <why>", "field": "<field>"}``."""

    def __init__(self, status, message):
        super().__init__(status)
        self.message = message
        self.field = message.split(":", 1)[0]


def clean_values(body, partial):
    """The row values of a request body: known columns, strings, a known status."""
    values = {}
    for key, value in body.items():
        if key in ("id", "order", "updated_by", "updated_at"):
            continue
        if key not in COLUMNS:
            raise Refused(400, f"{key}: unknown column (columns: {', '.join(COLUMNS)})")
        if not isinstance(value, str) or len(value) > 500:
            raise Refused(400, f"{key}: must be a string of at most 500 characters")
        if key == "status" and value not in STATUSES:
            raise Refused(400, f"status: must be one of {', '.join(STATUSES)}")
        values[key] = value.strip() if key == "name" else value
    if not partial and not values.get("name"):
        raise Refused(400, "name: required")
    if partial and not values:
        raise Refused(400, "body: no column to change")
    return values


class BaseHandler(tornado.web.RequestHandler):
    def initialize(self, rt, store, secret):
        self.rt, self.store, self.secret = rt, store, secret

    def set_default_headers(self):
        self.set_header("Cache-Control", "no-store")

    def json_body(self):
        try:
            body = ujson.loads(self.request.body or b"{}")
        except ValueError:
            raise Refused(400, "body: not JSON")
        if not isinstance(body, dict):
            raise Refused(400, "body: must be a JSON object")
        return body

    def user(self):
        """The signed-in user (``Authorization: JWT <token>``, as Baserow's REST API)."""
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        if scheme not in ("JWT", "Bearer") or not token:
            raise Refused(401, "Authorization: send 'JWT <token>' (POST /api/login)")
        try:
            claims = jwt.decode(token.strip(), self.secret, algorithms=["HS256"], options={"require": ["exp"]})
        except jwt.InvalidTokenError as exc:
            raise Refused(401, f"Authorization: {exc}")
        return claims["user_id"], claims.get("name", "")

    def table(self, table_id):
        if int(table_id) not in TABLES:
            raise Refused(404, "table_id: no such table")
        return int(table_id)

    def write_error(self, status_code, **kwargs):
        error = kwargs.get("exc_info", (None, None))[1]
        if isinstance(error, Refused):
            self.finish({"error": error.message, "field": error.field})
        else:
            self.finish({"error": self._reason, "field": None})


class LoginHandler(BaseHandler):
    def post(self):
        name = self.json_body().get("name")
        if not isinstance(name, str) or not name.strip() or len(name.strip()) > 40:
            raise Refused(400, "name: a non-empty string of at most 40 characters")
        name = name.strip()
        user_id = self.store.user(name)
        self.rt.directory.add_member(WORKSPACE, user_id)  # may see the workspace's tables
        claims = {"user_id": user_id, "name": name, "token_type": "access", "exp": int(time.time()) + 3600}
        self.write({"access_token": jwt.encode(claims, self.secret, algorithm="HS256"),
                    "user": {"id": user_id, "name": name}})


class TablesHandler(BaseHandler):
    def get(self):
        self.write({"results": [{"id": k, "name": v} for k, v in TABLES.items()]})


class RowsHandler(BaseHandler):
    def get(self, table_id):
        self.user()
        self.write({"results": self.store.rows(self.table(table_id))})

    def post(self, table_id):
        _, name = self.user()
        table_id = self.table(table_id)
        row = self.store.create(table_id, clean_values(self.json_body(), partial=False), name)
        self.rt.publish({"type": "rows_created", "table_id": table_id, "rows": [row],
                         "metadata": {}, "before_row_id": None},
                        ignore_web_socket_id=web_socket_id_from_request(self))
        self.write(row)


class RowHandler(BaseHandler):
    def row(self, table_id, row_id):
        table_id = self.table(table_id)
        row = self.store.get(table_id, int(row_id))
        if row is None:
            raise Refused(404, "row_id: no such row")
        return table_id, row

    def patch(self, table_id, row_id):
        _, name = self.user()
        table_id, before = self.row(table_id, row_id)
        changes = clean_values(self.json_body(), partial=True)
        row = self.store.update(table_id, before["id"], changes, name)
        self.rt.publish({"type": "rows_updated", "table_id": table_id, "rows_before_update": [before],
                         "rows": [row], "metadata": {}, "updated_field_ids": sorted(changes)},
                        ignore_web_socket_id=web_socket_id_from_request(self))
        self.write(row)

    def delete(self, table_id, row_id):
        self.user()
        table_id, row = self.row(table_id, row_id)
        self.store.delete(table_id, row["id"])
        self.rt.publish({"type": "rows_deleted", "table_id": table_id, "row_ids": [row["id"]], "rows": [row]},
                        ignore_web_socket_id=web_socket_id_from_request(self))
        self.set_status(204)


class UsersHandler(BaseHandler):
    def get(self):
        self.user()
        self.write({"results": self.store.all_users()})


class PageHandler(tornado.web.RequestHandler):
    def get(self):
        with open(os.path.join(STATIC, "index.html"), "rb") as fh:
            page = fh.read()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish(page)


class ClientScriptHandler(tornado.web.RequestHandler):
    """The project's browser client, served from the installed package."""

    def get(self):
        with open(CLIENT_JS, "rb") as fh:
            script = fh.read()
        self.set_header("Content-Type", "text/javascript; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish(script)


def make_app(secret, rt=None, store=None):
    """The application: its own routes plus tornado-rt's WebSocket endpoint."""
    if rt is None:
        rt = RealtimeServer(Settings(jwt_secret=secret), plugins=[dashboard_plugin])
        rt.directory.set_workspace(WORKSPACE, [])   # users join workspace 1 when they sign in ...
        for table_id in TABLES:
            rt.directory.set_table(table_id, WORKSPACE)  # ... which holds the tables
    store = store or Store()
    deps = {"rt": rt, "store": store, "secret": secret}
    app = tornado.web.Application([
        (r"/", PageHandler),
        (r"/client/tornado-rt\.js", ClientScriptHandler),
        (r"/static/(.*)", tornado.web.StaticFileHandler, {"path": STATIC}),
        (r"/api/login", LoginHandler, deps),
        (r"/api/tables", TablesHandler, deps),
        (r"/api/tables/(\d+)/rows", RowsHandler, deps),
        (r"/api/tables/(\d+)/rows/(\d+)", RowHandler, deps),
        (r"/api/users", UsersHandler, deps),
        *rt.routes(),
    ])
    return app, rt


async def main():
    from tornado.netutil import bind_sockets

    port = int(os.environ.get("EXAMPLE_PORT", "8080"))
    host = os.environ.get("EXAMPLE_HOST", "127.0.0.1")
    secret = os.environ.get("EXAMPLE_JWT_SECRET") or secrets.token_urlsafe(32)
    data_dir = os.environ.get("EXAMPLE_DATA_DIR") or tempfile.mkdtemp(prefix="tornado-rt-example-")
    os.makedirs(data_dir, exist_ok=True)
    db_path = os.path.join(data_dir, "example.sqlite3")
    app, rt = make_app(secret, store=Store(db_path))
    await rt.start()
    sockets = bind_sockets(port, host)
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    print(f"data: {db_path}", flush=True)
    print(f"example app: http://{host}:{port}/  (open it in two browsers; WebSocket ws://{host}:{port}/ws/core/)",
          flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
