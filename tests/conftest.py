"""Shared fixtures: a real tornado-rt server listening on a free port (pytest-tornado), real
WebSocket clients, JWTs, and the barrier that proves a message did NOT arrive."""
import asyncio
import itertools
import time

import jwt
import pytest
import ujson
from tornado.websocket import websocket_connect

from tornado_rt import MessageType, PageType, Plugin, RealtimeServer, Settings, normalize_id

SECRET = "test-secret-that-is-long-enough-for-hs256"

_marker_ids = itertools.count(1)

# A third-party plugin, built with the public API only: a `dashboard` page and two messages.
test_plugin = Plugin(
    "testing",
    page_types=[PageType("dashboard", ("dashboard_id",), "dashboard-{dashboard_id}",
                         lambda principal, params, policy: principal.user_id is not None)],
    message_types=[
        MessageType("test_marker"),
        MessageType("dashboard_updated", "page", page="dashboard",
                    keys={"dashboard_id": "dashboard_id"}, payload=("dashboard_id",)),
    ],
)


def make_token(user_id=1, secret=SECRET, algorithm="HS256", lifetime=300, **claims):
    payload = {"user_id": user_id, "exp": int(time.time()) + lifetime, "token_type": "access"}
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm=algorithm)


def pytest_configure(config):
    config.addinivalue_line("markers", "rt_settings(**overrides): Settings overrides for the `settings` fixture")
    config.addinivalue_line("markers", "rt_server(**kwargs): extra RealtimeServer keyword arguments "
                                       "for the `server` fixture (plugins= is added to the test plugin)")


@pytest.fixture
def settings(request):
    marker = request.node.get_closest_marker("rt_settings")
    overrides = dict(marker.kwargs) if marker else {}
    return Settings(**{"jwt_secret": SECRET, "ping_interval": 0, **overrides})


@pytest.fixture
def server(settings, request):
    marker = request.node.get_closest_marker("rt_server")
    kwargs = {"load_entry_points": False, **(marker.kwargs if marker else {})}
    kwargs["plugins"] = [test_plugin, *kwargs.get("plugins", ())]
    srv = RealtimeServer(settings, **kwargs)
    d = srv.directory
    d.set_workspace(1, [1, 2, 3])
    d.set_workspace(2, [4])
    d.set_table(10, 1)
    d.set_table(11, 1)
    d.set_table(20, 2)
    d.set_public_view("pub", 10)
    d.set_public_view("secret-view", 10, token="s3cret")
    return srv


@pytest.fixture
def app(server):
    return server.make_app()


@pytest.fixture
def ws_url(http_server, http_port):
    return f"ws://127.0.0.1:{http_port}/ws/core/"


class Client:
    """A real WebSocket client that decodes JSON messages."""

    def __init__(self, conn):
        self.conn = conn
        self.web_socket_id = None

    async def recv(self):
        msg = await self.conn.read_message()
        assert msg is not None, f"connection closed (code {self.conn.close_code})"
        return ujson.loads(msg)

    def send(self, obj):
        return self.conn.write_message(obj if isinstance(obj, (str, bytes)) else ujson.dumps(obj),
                                       binary=isinstance(obj, bytes))

    async def subscribe(self, page, **params):
        await self.send({"page": page, **params})
        reply = await self.recv()
        assert reply["type"] == "page_add", reply
        return reply

    async def closed(self):
        """Read until the server closes; returns the close code."""
        while await self.conn.read_message() is not None:
            pass
        return self.conn.close_code

    async def expect_close(self):
        """Assert that the server closes the connection with nothing more sent; return the code."""
        msg = await self.conn.read_message()
        assert msg is None, f"expected the connection to close, got {msg!r}"
        return self.conn.close_code

    def close(self):
        self.conn.close()


@pytest.fixture
def connect(ws_url):
    clients = []

    async def _connect(token=None, user_id=1, authenticate=True, url=None, query=None):
        """``query``: the raw query string (e.g. "" for no token at all) instead of ?jwt_token=."""
        if query is None:
            if token is None:
                token = make_token(user_id)
            query = f"?jwt_token={token}"
        conn = await websocket_connect(f"{url or ws_url}{query}")
        client = Client(conn)
        clients.append(client)
        if authenticate:
            auth = await client.recv()
            assert auth["type"] == "authentication" and auth["success"] is True, auth
            client.web_socket_id = auth["web_socket_id"]
        return client

    yield _connect
    for c in clients:
        c.close()


@pytest.fixture
def barrier(server):
    """``await barrier(*clients)``: publish a marker to every connection and assert that it is
    the next message each client receives — so nothing else arrived before it."""

    async def _barrier(*clients):
        marker = {"type": "test_marker", "n": next(_marker_ids)}
        server.publish(marker, {"all_users": True})
        for client in clients:
            got = await client.recv()
            assert got == marker, f"expected nothing before the marker, got {got}"

    return _barrier


def id_of(value):
    return normalize_id(value)


async def wait_until(condition, timeout=5.0):
    """Wait for ``condition()`` to become true (e.g. the server has run ``on_close``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)  # barrier-ok: waits for a condition, asserts nothing about time
