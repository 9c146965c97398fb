"""Graceful shutdown for the embedded case (issue 5 §4): ``await server.shutdown()`` closes every
connection with 1001 after flushing what was already published, and refuses new upgrades."""
import asyncio
import logging

import pytest
import ujson
from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

from conftest import make_token
from live_server import logged_errors
from tornado_rt import closecodes


def rows(n, table_id=10, size=0):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": n, "text": "x" * size}],
            "metadata": {}, "before_row_id": None}


@pytest.mark.gen_test(timeout=30)
async def test_shutdown_flushes_then_closes_every_connection_with_1001(server, connect, caplog):
    n = 500
    page = await connect(user_id=1)
    await page.subscribe("table", table_id=10)
    idle = await connect(user_id=4)  # nothing published for it
    anonymous = await connect(token="anonymous")
    for i in range(n):
        server.publish(rows(i, size=2000))  # ~1 MB queued, not yet written
    closing = asyncio.ensure_future(server.shutdown())
    for i in range(n):
        assert await page.recv() == rows(i, size=2000)
    for client in (page, idle, anonymous):
        assert await client.expect_close() == closecodes.GOING_AWAY
    await closing
    assert not server.hub.connections and not server.hub.groups and not server.hub.users
    assert server.hub.anonymous == 0
    assert server.counters.closed["going_away"] == 3
    assert not logged_errors(caplog.records)


@pytest.mark.gen_test(timeout=30)
async def test_shutdown_waits_for_the_connections_to_end(server, connect):
    clients = [await connect(user_id=1) for _ in range(5)]
    handlers = list(server.hub.connections.values())
    await server.shutdown()
    # the clients answered the close frames; shutdown returned once their sockets were gone
    assert all(h.disconnected for h in handlers)
    for client in clients:
        assert await client.expect_close() == closecodes.GOING_AWAY


@pytest.mark.gen_test(timeout=30)
async def test_no_upgrade_after_shutdown(server, connect, ws_url):
    client = await connect(user_id=1)
    await server.shutdown()
    assert await client.expect_close() == closecodes.GOING_AWAY
    with pytest.raises(HTTPClientError) as refused:
        await websocket_connect(f"{ws_url}?jwt_token={make_token(2)}")
    assert refused.value.code == 503
    assert not server.hub.connections


@pytest.mark.gen_test(timeout=30)
async def test_connection_authenticated_during_shutdown_is_closed_with_1001(server, ws_url):
    """An async authenticator that answers after shutdown() began must not leave a connection
    behind: it is closed with 1001 instead of being authenticated."""
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def slow_authenticator(token):
        entered.set()
        await gate.wait()
        return 1

    server.authenticator = slow_authenticator
    conn = await websocket_connect(f"{ws_url}?jwt_token=whatever")
    await entered.wait()
    closing = asyncio.ensure_future(server.shutdown())
    await asyncio.sleep(0)  # shutdown() has begun (nothing to close yet)
    gate.set()
    assert await conn.read_message() is None  # no authentication message
    assert conn.close_code == closecodes.GOING_AWAY
    await closing
    assert not server.hub.connections


@pytest.mark.gen_test(timeout=30)
async def test_backlog_that_cannot_drain_is_discarded_so_1001_still_goes_out(server, connect, http_port,
                                                                             caplog):
    """Issue 10 §11: a client that stopped reading with megabytes queued for it still finds the
    1001 close frame once it reads: after half the timeout its backlog is dropped, the frame in
    progress is finished first (whole frames, then the close frame, nothing spliced)."""
    import socket

    from conftest import wait_until
    from raw_client import CLOSE, TEXT, RawClient

    caplog.set_level(logging.INFO, logger="tornado_rt.server")
    fast = await connect(user_id=2)
    await fast.subscribe("table", table_id=10)
    raw = await RawClient.connect(http_port, f"?jwt_token={make_token(1)}", rcvbuf=4096)
    await raw.recv()
    await raw.send({"page": "table", "table_id": 10})
    assert (await raw.recv())["type"] == "page_add"
    (session,) = [s for s in server.hub.connections.values() if s.user_id == 1]
    session.transport.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    # from here on the raw client does not read
    for i in range(64):
        server.publish(rows(i, size=32 * 1024))  # 2 MiB in one loop iteration: one write
    for i in range(64):
        assert (await fast.recv())["rows"][0]["id"] == i
    transport = session.transport
    assert transport.buffered() > 1024 * 1024
    closing = asyncio.ensure_future(server.shutdown(timeout=4))
    assert await fast.expect_close() == closecodes.GOING_AWAY
    await wait_until(lambda: transport.buffered() < 64 * 1024)  # discarded after 2 s
    ids = []
    while True:
        frame = await raw.recv_frame()
        assert frame is not None, f"the stream ended without a close frame after {len(ids)} messages"
        if frame[0] != TEXT:
            break
        ids.append(ujson.loads(frame[1])["rows"][0]["id"])  # whole frames only
    assert frame[0] == CLOSE and frame[1][:2] == closecodes.GOING_AWAY.to_bytes(2, "big")
    assert ids == list(range(len(ids))) and len(ids) < 64
    raw.close()
    await closing
    assert not logged_errors(caplog.records)
    assert any("discarded so the close frame" in r.getMessage() for r in caplog.records)
