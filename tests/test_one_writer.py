"""One writer per connection (issue 9 §1): every byte of a connection (messages, pongs, close
frames) goes through one writer, so frames are never spliced into each other or reordered,
whatever the kernel accepts.

The scenario is the one a hostile peer can set up: the server's send buffer is nearly full (a
small ``SO_SNDBUF`` on the accepted socket, a client with a small ``SO_RCVBUF`` that stops
reading), the client sends pings until Tornado holds part of a pong in its own buffer, the client
then reads a little (the kernel has room again, but the server's loop has not run yet), and a
message is published in that same loop iteration. A writer that sends directly on the socket
because *it* has nothing buffered puts the text frame into the middle of the pong.
"""
import select
import socket

import pytest
import ujson

from conftest import make_token, wait_until
from raw_client import CLOSE, PING, PONG, TEXT, RawClient, client_frame

PONG_PAYLOAD = b"p" * 125  # the largest control payload: the easiest to cut in two


def rows(n):
    return {"type": "rows_created", "table_id": 10, "rows": [{"id": n, "name": "x" * 200}],
            "metadata": {}, "before_row_id": None}


def server_side(server, web_socket_id):
    """(Tornado's WebSocket protocol object, its IOStream) of one connection, for the setup."""
    conn = server.hub.connections[web_socket_id]
    transport = getattr(conn, "transport", None)
    if transport is not None:
        return transport.protocol, transport.stream
    return conn.ws_connection, conn.stream


def tornado_buffered(stream):
    """Bytes Tornado holds for this stream (test setup only: it reads Tornado's internals)."""
    return stream._total_write_index - stream._total_write_done_index


async def stalled_client(server, port, **kwargs):
    raw = await RawClient.connect(port, f"?jwt_token={make_token(1)}", rcvbuf=4096, **kwargs)
    web_socket_id = (await raw.recv())["web_socket_id"]
    await raw.send({"page": "table", "table_id": 10})
    assert (await raw.recv())["type"] == "page_add"
    protocol, stream = server_side(server, web_socket_id)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return raw, protocol, stream


async def fill_with_pongs(raw, protocol, stream):
    """Ping until Tornado itself holds (part of) a pong: the kernel buffers are full."""
    for i in range(2000):
        before = protocol._wire_bytes_in
        await raw.send_raw(client_frame(PONG_PAYLOAD, PING))
        await wait_until(lambda: protocol._wire_bytes_in > before)
        if tornado_buffered(stream):
            return
    raise AssertionError("the server's buffers never filled up")


def make_room(raw, server_socket):
    """Read what has arrived on the client, without letting the server's loop run, until the
    server's socket can take bytes again: the next write would be accepted by the kernel."""
    for _ in range(200):
        while True:
            try:
                chunk = raw.recv_now()
            except BlockingIOError:
                break
            if not chunk:
                return
        _, writable, _ = select.select([], [server_socket], [], 0.05)  # barrier-ok: bounded wait for the kernel
        if writable:
            return
    raise AssertionError("the server's socket never became writable")


async def read_all_frames(raw):
    frames = []
    while True:
        try:
            frame = await raw.recv_frame()
        except ConnectionResetError:
            break
        if frame is None:
            break
        frames.append(frame)
        assert_intact(frames[-1:])  # at once: after a splice the lengths are garbage
        if frame[0] == CLOSE:
            break
    return frames


def assert_intact(frames):
    """Every pong carries exactly the ping's payload (nothing spliced into it) and every text
    frame is a whole JSON message."""
    for opcode, payload in frames:
        assert opcode in (PONG, PING, TEXT, CLOSE), f"corrupt stream: opcode {opcode}, {payload[:60]!r}"
        if opcode == PONG:
            assert payload == PONG_PAYLOAD, f"a frame was spliced into a pong: {payload[:60]!r}"
        if opcode == TEXT:
            ujson.loads(payload)


@pytest.mark.gen_test(timeout=60)
async def test_publish_after_a_partly_written_pong_keeps_both_frames_intact(server, http_server, http_port):
    raw, protocol, stream = await stalled_client(server, http_port)
    await fill_with_pongs(raw, protocol, stream)
    make_room(raw, stream.socket)
    server.publish(rows(1))  # same loop iteration: Tornado still holds the rest of the pong
    frames = []
    while not frames or frames[-1][0] != TEXT:
        frame = await raw.recv_frame()
        assert frame is not None, "connection closed"
        frames.append(frame)
        assert_intact(frames[-1:])  # at once: after a splice the lengths are garbage
    assert [f[0] for f in frames[:-1]] == [PONG] * (len(frames) - 1)  # the pongs first, in order
    assert ujson.loads(frames[-1][1]) == rows(1)
    # and the connection still works
    server.publish(rows(2))
    assert await raw.recv() == rows(2)
    raw.close()


@pytest.mark.gen_test(timeout=60)
async def test_close_behind_a_partly_written_pong_then_publish(server, http_server, http_port):
    """A server-side close (force disconnect: a message, then the close frame) while Tornado
    holds part of a pong, and a publish in the same iteration: the client reads the pongs, the
    message, the close frame, all intact, and nothing after the close frame."""
    raw, protocol, stream = await stalled_client(server, http_port)
    await fill_with_pongs(raw, protocol, stream)
    make_room(raw, stream.socket)
    server.disconnect([1])
    server.publish(rows(1))  # the connection has left: never sent, least of all after the close
    frames = await read_all_frames(raw)
    assert_intact(frames)
    kinds = [f[0] for f in frames]
    assert kinds[-2:] == [TEXT, CLOSE], kinds
    assert set(kinds[:-2]) <= {PONG}
    assert ujson.loads(frames[-2][1]) == {"type": "force_disconnect"}
    assert frames[-1][1][:2] == (4003).to_bytes(2, "big")
    await raw.send_raw(client_frame(frames[-1][1][:2], CLOSE))  # answer it: the server ends TCP
    assert await raw.recv_frame() is None  # nothing after the close frame
    raw.close()


@pytest.mark.gen_test(timeout=60)
async def test_partly_written_close_frame_then_publish_sends_nothing_after_it(server, http_server, http_port):
    """The close frame (with a long reason) is written while Tornado still holds the rest of a
    pong, so it waits in Tornado's buffer behind it; a message is published and flushed in the
    same iteration: the frames arrive intact and nothing follows the close frame."""
    raw, protocol, stream = await stalled_client(server, http_port)
    await fill_with_pongs(raw, protocol, stream)
    (conn,) = server.hub.connections.values()
    server.hub.close(conn, 4008, "r" * 120)  # a long reason: a close frame of 124 bytes
    server.publish(rows(1))
    server.hub.flush()
    make_room(raw, stream.socket)
    frames = await read_all_frames(raw)
    assert_intact(frames)
    kinds = [f[0] for f in frames]
    assert kinds[-1] == CLOSE and set(kinds[:-1]) <= {PONG}, kinds
    assert frames[-1][1] == (4008).to_bytes(2, "big") + b"r" * 120
    await raw.send_raw(client_frame(frames[-1][1][:2], CLOSE))  # answer it: the server ends TCP
    assert await raw.recv_frame() is None
    raw.close()
