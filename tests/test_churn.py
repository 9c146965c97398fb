"""Churn and abrupt disconnects (issue 5): clients vanishing with a TCP reset in the middle of a
fan-out break nothing, and thousands of connect/subscribe/disconnect cycles leave the hub's
indexes empty and the process's memory near where it started."""
import asyncio
import gc

import pytest
from tornado.websocket import websocket_connect

from conftest import make_token, wait_until
from live_server import logged_errors, rss_kib
from raw_client import RawClient
from tornado_rt.connection import RealtimeHandler


def rows(n, size=0):
    return {"type": "rows_created", "table_id": 10, "rows": [{"id": n, "blob": "x" * size}],
            "metadata": {}, "before_row_id": None}


async def raw_subscriber(port, user_id):
    raw = await RawClient.connect(port, f"?jwt_token={make_token(user_id)}", rcvbuf=4096)
    await raw.recv()
    await raw.send({"page": "table", "table_id": 10})
    assert (await raw.recv())["type"] == "page_add"
    return raw


@pytest.mark.gen_test(timeout=60)
async def test_resets_in_the_middle_of_a_fan_out(server, connect, barrier, http_port, caplog):
    survivors = [await connect(user_id=u) for u in (1, 2, 3)]
    for client in survivors:
        await client.subscribe("table", table_id=10)
    doomed = [await raw_subscriber(http_port, 1 + i % 3) for i in range(50)]
    assert len(server.hub.groups["table-10"]) == 53
    expected = []

    def publish(count, size):
        for _ in range(count):
            msg = rows(len(expected), size)
            expected.append(msg)
            server.publish(msg)

    publish(20, 100)              # queued for all 53, not yet written
    for raw in doomed[:25]:       # reset before the flush writes to them
        raw.reset()
    publish(20, 100)
    await asyncio.sleep(0)        # let the loop flush: writes to reset sockets fail
    publish(30, 64 * 1024)        # large: the silent raw sockets' buffers fill up
    await asyncio.sleep(0)
    for raw in doomed[25:]:       # reset while their buffers hold unsent data
        raw.reset()
    publish(30, 64 * 1024)
    for client in survivors:
        for i, msg in enumerate(expected):
            got = await client.recv()
            assert got["rows"][0]["id"] == i and got == msg
    await wait_until(lambda: len(server.hub.connections) == 3, timeout=10)
    await barrier(*survivors)
    assert {c.web_socket_id for c in server.hub.groups["table-10"]} == {c.web_socket_id for c in survivors}
    assert set(server.hub.users) == {1, 2, 3}
    assert all(len(conns) == 1 for conns in server.hub.users.values())
    assert not logged_errors(caplog.records)


def live_handlers():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, RealtimeHandler))


@pytest.mark.gen_test(timeout=120)
async def test_churn_2000_cycles_leaves_nothing_behind(server, ws_url, http_port, caplog):
    """2,000 connect / authenticate / subscribe / disconnect cycles, 50 at a time: three in four
    end with a clean close, one in four with a TCP reset. Afterwards the hub's indexes are empty,
    no handler object survives, and RSS is back near its baseline."""

    async def clean_cycle(i):
        conn = await websocket_connect(f"{ws_url}?jwt_token={make_token(1 + i % 3)}")
        assert '"success":true' in await conn.read_message()
        conn.write_message('{"page":"table","table_id":%d}' % (10 + i % 2))
        assert '"page_add"' in await conn.read_message()
        conn.close()
        assert await conn.read_message() is None

    async def reset_cycle(i):
        raw = await RawClient.connect(http_port, f"?jwt_token={make_token(1 + i % 3)}")
        await raw.recv()
        await raw.send({"page": "row", "table_id": 10, "row_id": i})
        assert (await raw.recv())["type"] == "page_add"
        raw.reset()

    async def cycles(first, count):
        for start in range(first, first + count, 50):
            await asyncio.gather(*(reset_cycle(i) if i % 4 == 3 else clean_cycle(i)
                                   for i in range(start, start + 50)))
        await wait_until(lambda: not server.hub.connections, timeout=10)

    await cycles(0, 200)  # warm-up: imports, caches and allocator arenas settle
    gc.collect()
    baseline = rss_kib()
    handlers_before = live_handlers()
    await cycles(200, 2000)
    gc.collect()
    after = rss_kib()
    handlers_after = live_handlers()
    growth_mib = (after - baseline) / 1024
    print(f"\nchurn: 2000 cycles; RSS baseline {baseline / 1024:.1f} MiB, after {after / 1024:.1f} MiB "
          f"({growth_mib:+.1f} MiB); handler objects alive {handlers_before} -> {handlers_after}; "
          f"connections opened {server.counters.connections_opened}")
    hub = server.hub
    assert hub.connections == {} and hub.users == {} and hub.groups == {} and hub.anonymous == 0
    assert hub._dirty == []
    assert server.counters.connections_opened == 2200
    assert handlers_after <= handlers_before
    assert growth_mib < 16, f"RSS grew by {growth_mib:.1f} MiB over 2000 cycles"
    assert not logged_errors(caplog.records)
