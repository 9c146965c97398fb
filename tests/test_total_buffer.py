"""A global budget for bytes queued behind readers (issue 10 §10): ``max_total_outgoing_buffer``
bounds the unsent bytes of all connections together. Past it the connections holding the most
are dropped first (4009, counted as ``slow_consumer``, refusal ``total_outgoing_buffer``) until
the total is under it, while a fast reader keeps receiving everything in order; each stalled
reader is far below its own ``max_outgoing_buffer``, so only the budget can drop them."""
import socket

import pytest

from conftest import make_token
from raw_client import RawClient
from tornado_rt import Settings, refusals
from tornado_rt.settings import default_total_outgoing_buffer, memory_limit

MIB = 1024 * 1024
CHUNK = 16 * 1024
STALLED = 5


def update(dashboard, n):
    return {"type": "dashboard_updated", "dashboard_id": dashboard, "n": n, "blob": "x" * CHUNK}


def test_the_default_budget_is_a_quarter_of_memory():
    memory = memory_limit()
    assert memory is not None and memory > 0  # Linux: sysconf and /sys/fs/cgroup
    assert default_total_outgoing_buffer() == max(64 * MIB, memory // 4)
    assert Settings().max_total_outgoing_buffer is None
    assert Settings().total_outgoing_budget == default_total_outgoing_buffer()
    assert Settings(max_total_outgoing_buffer=0).total_outgoing_budget == 0  # unlimited
    with pytest.raises(ValueError, match="max_total_outgoing_buffer"):
        Settings(max_total_outgoing_buffer=-1)


@pytest.mark.rt_settings(max_total_outgoing_buffer=1 * MIB, max_outgoing_buffer=64 * MIB)
@pytest.mark.gen_test(timeout=60)
async def test_over_the_budget_the_largest_backlogs_are_dropped_first(server, connect, barrier, http_port):
    before = refusals.REFUSALS.count("connection", "total_outgoing_buffer")
    fast = await connect(user_id=2)
    for d in range(STALLED):
        await fast.subscribe("dashboard", dashboard_id=d)
    stalled = []
    for d in range(STALLED):  # stalled reader d gets d + 1 messages per round
        raw = await RawClient.connect(http_port, f"?jwt_token={make_token(1)}", rcvbuf=4096)
        ws_id = (await raw.recv())["web_socket_id"]
        await raw.send({"page": "dashboard", "dashboard_id": d})
        assert (await raw.recv())["type"] == "page_add"
        # a small kernel send buffer on the server's side, so the backlog is Tornado's to hold
        # (autotuned, the kernel would absorb megabytes per connection first)
        server.hub.connections[ws_id].transport.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        stalled.append((raw, ws_id))
    # from here on the stalled readers never read
    n = 0
    for _ in range(30):  # 30 rounds of 15 x 16 KiB: 7 MiB in all, at most 2.3 MiB for one reader
        sent = []
        for d in range(STALLED):
            for _ in range(d + 1):
                n += 1
                sent.append(update(d, n))
                server.publish(sent[-1])
        for msg in sent:  # everything, in order, while the loop flushes to the stalled readers
            assert await fast.recv() == msg
    await barrier(fast)
    alive = [d for d, (_, ws_id) in enumerate(stalled) if ws_id in server.hub.connections]
    dropped = [d for d in range(STALLED) if d not in alive]
    print(f"\nbudget 1 MiB: dropped {dropped}, kept {alive}")
    assert dropped, "nothing was dropped although the total passed the budget"
    assert 0 in alive  # the smallest backlog stays: the total came back under the budget first
    assert min(dropped) > max(alive)  # the largest ones went first
    assert server.counters.closed["slow_consumer"] == len(dropped)
    assert refusals.REFUSALS.count("connection", "total_outgoing_buffer") - before == len(dropped)
    held = sum(server.hub.connections[ws_id].transport.buffered() for _, ws_id in stalled
               if ws_id in server.hub.connections)
    assert held <= 1 * MIB
    for raw, _ in stalled:
        raw.close()


@pytest.mark.rt_settings(max_total_outgoing_buffer=0, max_outgoing_buffer=64 * MIB)
@pytest.mark.gen_test(timeout=60)
async def test_without_a_budget_no_reader_is_dropped(server, connect, barrier, http_port):
    fast = await connect(user_id=2)
    await fast.subscribe("dashboard", dashboard_id=0)
    raw = await RawClient.connect(http_port, f"?jwt_token={make_token(1)}", rcvbuf=4096)
    ws_id = (await raw.recv())["web_socket_id"]
    await raw.send({"page": "dashboard", "dashboard_id": 0})
    assert (await raw.recv())["type"] == "page_add"
    # as above: a small kernel send buffer, so the backlog really is held by the server
    server.hub.connections[ws_id].transport.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    for n in range(160):  # 2.5 MiB
        server.publish(update(0, n))
        assert await fast.recv() == update(0, n)
    await barrier(fast)
    assert ws_id in server.hub.connections
    # more than any budget the other tests use was really held: budget 0 means no budget
    assert server.hub.connections[ws_id].transport.buffered() > 1 * MIB
    assert server.counters.closed["slow_consumer"] == 0
    raw.close()
