"""Heartbeats (issue 5 §3): the server pings every ``ping_interval``; a peer that does not answer
within ``ping_timeout`` is closed and its subscriptions are released, while a peer that answers
(Tornado's client answers pings by itself) stays connected and keeps receiving."""
import asyncio
import time

import pytest
import ujson

from conftest import make_token
from live_server import logged_errors
from raw_client import CLOSE, PING, PONG, TEXT, RawClient, client_frame


def rows(n, table_id=10):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": n}], "metadata": {},
            "before_row_id": None}


@pytest.mark.rt_settings(ping_interval=0.2, ping_timeout=0.2)
@pytest.mark.gen_test(timeout=30)
async def test_silent_peer_is_closed_and_its_subscriptions_released(server, connect, barrier,
                                                                   http_port, caplog):
    good = await connect(user_id=2)
    await good.subscribe("table", table_id=10)
    silent = await RawClient.connect(http_port, f"?jwt_token={make_token(1)}")
    setup_frames = []  # on a busy machine a heartbeat ping may already come during the set-up

    async def recv_text():
        while True:
            opcode, payload = await silent.recv_frame()
            setup_frames.append(opcode)
            if opcode == TEXT:
                return ujson.loads(payload)
            assert opcode == PING

    auth = await recv_text()
    await silent.send({"page": "table", "table_id": 10})
    assert (await recv_text())["type"] == "page_add"
    await silent.send({"page": "table", "table_id": 11})
    assert (await recv_text())["type"] == "page_add"
    # from here on the raw client neither reads nor answers a ping
    assert auth["web_socket_id"] in server.hub.connections
    server.publish(rows(1))
    assert await good.recv() == rows(1)

    deadline = time.monotonic() + 10
    while auth["web_socket_id"] in server.hub.connections:  # barrier-ok: bounded wait for the drop
        assert time.monotonic() < deadline, "the silent peer was never dropped"
        await asyncio.sleep(0.05)  # barrier-ok: bounded wait for the drop

    assert server.counters.closed["ping_timeout"] == 1
    assert {c.web_socket_id for c in server.hub.groups["table-10"]} == {good.web_socket_id}
    assert "table-11" not in server.hub.groups
    assert 1 not in server.hub.users
    # the well-behaved client lived through the same pings and still receives
    server.publish(rows(2))
    assert await good.recv() == rows(2)
    await barrier(good)
    assert good.web_socket_id in server.hub.connections

    # what the silent peer was sent: the page message, at least one ping, then the end
    frames = []
    while True:
        frame = await silent.recv_frame()
        if frame is None or frame[0] == CLOSE:
            break
        frames.append(frame)
    assert [f[0] for f in frames if f[0] == TEXT] == [TEXT]
    assert PING in setup_frames + [f[0] for f in frames]
    assert not logged_errors(caplog.records)


@pytest.mark.rt_settings(ping_interval=0.2, ping_timeout=0.2)
@pytest.mark.gen_test(timeout=30)
async def test_peer_that_answers_pings_is_kept(server, connect, barrier, http_port):
    client = await connect(user_id=1)
    await client.subscribe("table", table_id=10)
    pinger = await RawClient.connect(http_port, f"?jwt_token={make_token(2)}")
    await pinger.recv()
    pings = 0
    while pings < 4:  # four rounds of ping/pong, answered by hand
        opcode, payload = await pinger.recv_frame()
        assert opcode == PING
        pings += 1
        await pinger.send_raw(client_frame(payload, PONG))
    assert server.counters.closed["ping_timeout"] == 0
    assert len(server.hub.connections) == 2
    server.publish(rows(1))
    assert await client.recv() == rows(1)
    await barrier(client)
    assert (await pinger.recv())["type"] == "test_marker"
    pinger.close()


def test_ping_timeout_cannot_exceed_the_interval():
    from tornado_rt import Settings
    with pytest.raises(ValueError, match="ping_timeout"):
        Settings(ping_interval=1, ping_timeout=2)
    assert Settings(ping_interval=0).ping_interval == 0  # 0 disables pings
