"""The fan-out fast path writes pre-built frames (and coalesces several into one socket write).
An independent, strict client — the ``websockets`` library, which validates every frame header,
length encoding, the absence of a mask and UTF-8 — must read exactly what was published."""
import pytest
import ujson
import websockets

from conftest import make_token

# Sizes around the three length encodings of RFC 6455 §5.2 (7-bit, 16-bit, 64-bit) and one
# message large enough that the kernel cannot take it in one send (the partial-write path).
SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000, 4 * 1024 * 1024]


def message(n, size):
    text = "é€😀"  # 2, 3 and 4 bytes in UTF-8
    filler = (text * (size // 9 + 1))[: max(0, size // 3)]
    return {"type": "rows_created", "table_id": 10, "rows": [{"id": n, "name": filler}],
            "metadata": {}, "before_row_id": None}


async def strict_client(ws_url, user_id=1):
    client = await websockets.connect(f"{ws_url}?jwt_token={make_token(user_id)}", max_size=None,
                                      compression=None)
    auth = ujson.loads(await client.recv())
    assert auth["success"] is True
    await client.send(ujson.dumps({"page": "table", "table_id": 10}))
    assert ujson.loads(await client.recv())["type"] == "page_add"
    return client


@pytest.mark.gen_test(timeout=30)
async def test_strict_client_reads_every_frame_size_and_non_ascii(server, ws_url):
    clients = [await strict_client(ws_url, user_id) for user_id in (1, 2, 3)]
    sent = []
    for n, size in enumerate(SIZES):
        msg = message(n, size)
        server.publish(msg)
        sent.append(msg)
    for client in clients:
        for msg in sent:
            raw = await client.recv()
            assert isinstance(raw, str)  # a text frame
            assert ujson.loads(raw) == msg
        await client.close()


@pytest.mark.gen_test(timeout=30)
async def test_many_messages_coalesced_in_one_write_arrive_as_separate_frames(server, ws_url):
    client = await strict_client(ws_url)
    sent = [message(n, 200 + n) for n in range(300)]
    for msg in sent:  # all in one loop iteration: one joined write per connection
        server.publish(msg)
    for msg in sent:
        assert ujson.loads(await client.recv()) == msg
    await client.close()


@pytest.mark.gen_test
async def test_connections_send_without_nagle_delay(server, connect):
    import socket

    client = await connect(user_id=1)
    session = server.hub.connections[client.web_socket_id]
    assert session.transport.stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_tune_gc_freezes_start_up_objects_and_raises_the_threshold():
    import gc

    from tornado_rt import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc(threshold=12345)
        assert gc.get_threshold() == (12345, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
