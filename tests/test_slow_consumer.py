"""Slow consumers (issue 5 §2): a client that stops reading while ~50 MB are published to its
page is dropped once its unsent bytes pass ``max_outgoing_buffer`` (default 8 MiB; close code
4009, or the TCP connection simply dropped since a close frame would queue behind the full
buffer), it is counted in ``counters.closed["slow_consumer"]``, the server's memory stays
bounded, and a fast client on the same page receives every message, in order.

The server runs in the test process, so its memory is this process's VmRSS. The slow client is
a raw socket with a small ``SO_RCVBUF`` that never calls ``recv`` after subscribing.
"""
import pytest

from conftest import make_token
from live_server import logged_errors, rss_kib
from raw_client import TEXT, RawClient

MESSAGE_BYTES = 64 * 1024
MESSAGES = 800          # 800 x 64 KiB = 50 MiB published to the page
CHUNK = 16              # published per loop iteration: 1 MiB


def rows(n):
    return {"type": "rows_created", "table_id": 10, "rows": [{"id": n, "blob": "x" * MESSAGE_BYTES}],
            "metadata": {}, "before_row_id": None}


@pytest.mark.gen_test(timeout=120)
async def test_reader_that_stops_is_dropped_and_memory_stays_bounded(server, connect, barrier,
                                                                     http_port, caplog):
    limit = server.settings.max_outgoing_buffer
    assert limit == 8 * 1024 * 1024  # the default
    fast = await connect(user_id=2)
    await fast.subscribe("table", table_id=10)
    slow = await RawClient.connect(http_port, f"?jwt_token={make_token(1)}", rcvbuf=4096)
    slow_id = (await slow.recv())["web_socket_id"]
    await slow.send({"page": "table", "table_id": 10})
    assert (await slow.recv())["type"] == "page_add"
    # from here on the slow client never reads

    baseline = rss_kib()
    peak = baseline
    dropped_after = None
    for start in range(0, MESSAGES, CHUNK):
        for n in range(start, start + CHUNK):
            server.publish(rows(n))
        for n in range(start, start + CHUNK):  # the loop runs while the fast client reads
            got = await fast.recv()
            assert got["rows"][0]["id"] == n, f"expected message {n}, got {got['rows'][0]['id']}"
        peak = max(peak, rss_kib())
        if dropped_after is None and slow_id not in server.hub.connections:
            dropped_after = (start + CHUNK) * MESSAGE_BYTES
    await barrier(fast)

    growth_mib = (peak - baseline) / 1024
    print(f"\nslow consumer: published {MESSAGES * MESSAGE_BYTES / 2**20:.0f} MiB; slow client dropped "
          f"after {dropped_after / 2**20:.0f} MiB; RSS baseline {baseline / 1024:.1f} MiB, peak "
          f"{peak / 1024:.1f} MiB (+{growth_mib:.1f} MiB)")
    assert server.counters.closed["slow_consumer"] == 1
    assert slow_id not in server.hub.connections
    assert {c.web_socket_id for c in server.hub.groups["table-10"]} == {fast.web_socket_id}
    # dropped once its buffer passed the limit (plus what the kernel's socket buffers hold),
    # long before everything was published
    assert dropped_after is not None and dropped_after <= limit + 16 * 1024 * 1024
    # memory: an unbounded buffer would hold ~50 MiB for the slow client alone
    assert growth_mib < 40, f"RSS grew by {growth_mib:.1f} MiB"

    # the slow client, reading at last: a gap-free prefix of the messages, then the end of the
    # stream (the server dropped it; a 4009 close frame is accepted too)
    received = []
    while True:
        try:
            frame = await slow.recv_frame()
        except ConnectionResetError:
            frame = None
            break
        if frame is None or frame[0] != TEXT:
            break
        received.append(frame[1])
    ids = [int(p[p.index(b'"id":') + 5:p.index(b',', p.index(b'"id":'))]) for p in received]
    assert ids == list(range(len(ids))) and len(ids) < MESSAGES
    assert frame is None or frame[0] == 0x8 and frame[1][:2] == (4009).to_bytes(2, "big")
    assert not logged_errors(caplog.records)


@pytest.mark.rt_settings(max_outgoing_buffer=256 * 1024)
@pytest.mark.gen_test(timeout=60)
async def test_slow_consumer_does_not_delay_others(server, connect, barrier, http_port):
    """With a small limit, several stalled readers are dropped one by one while two fast
    readers on the same page keep receiving everything in order."""
    fast = [await connect(user_id=u) for u in (2, 3)]
    for client in fast:
        await client.subscribe("table", table_id=10)
    stalled = []
    for _ in range(5):
        raw = await RawClient.connect(http_port, f"?jwt_token={make_token(1)}", rcvbuf=4096)
        await raw.recv()
        await raw.send({"page": "table", "table_id": 10})
        assert (await raw.recv())["type"] == "page_add"
        stalled.append(raw)
    for start in range(0, 160, 8):
        for n in range(start, start + 8):
            server.publish(rows(n))
        for client in fast:
            for n in range(start, start + 8):
                assert (await client.recv())["rows"][0]["id"] == n
    await barrier(*fast)
    assert server.counters.closed["slow_consumer"] == 5
    assert len(server.hub.connections) == 2
    for raw in stalled:
        raw.close()
