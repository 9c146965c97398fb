"""docs/protocol.md §4: subscription changes the server initiates (revoke, member removed, table
deleted, force disconnect, close)."""
import base64
import os
import struct

import pytest
import ujson
from tornado.tcpclient import TCPClient

from tornado_rt import closecodes

from conftest import make_token, wait_until


def discard(page, **params):
    return {"type": "page_discard", "page": page, "parameters": params}


def rows(table_id):
    return {"type": "rows_created", "table_id": table_id, "rows": [], "metadata": {}, "before_row_id": None}


def key(msg):
    return ujson.dumps(msg, sort_keys=True)


async def recv_set(client, n):
    """The next ``n`` messages, as a set (for replies whose relative order the spec leaves open)."""
    return sorted([key(await client.recv()) for _ in range(n)])


def as_set(*msgs):
    return sorted(key(m) for m in msgs)


# --- permission revoked --------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_revoke_drops_table_and_row_pages_of_that_table_only(server, connect, barrier):
    a = await connect(user_id=1)
    a2 = await connect(user_id=1)  # the same user's second connection is revoked too
    b = await connect(user_id=2)  # another user keeps their table 10 page
    for c in (a, a2):
        await c.subscribe("table", table_id=10)
        await c.subscribe("row", table_id=10, row_id=1)
        await c.subscribe("row", table_id=10, row_id=2)
        await c.subscribe("table", table_id=11)
        await c.subscribe("row", table_id=11, row_id=1)
        await c.subscribe("view", slug="pub")
        await c.subscribe("dashboard", dashboard_id=10)
    await b.subscribe("table", table_id=10)

    assert server.revoke([1], "permissions-table-10") == 6
    expected = as_set(discard("table", table_id=10), discard("row", table_id=10, row_id=1),
                      discard("row", table_id=10, row_id=2))
    assert await recv_set(a, 3) == expected
    assert await recv_set(a2, 3) == expected
    await barrier(a, a2, b)

    server.publish(rows(10))
    assert await b.recv() == rows(10)
    server.publish({"type": "row_history_updated", "row_history_entry": {}, "table_id": 10, "row_id": 1})
    await barrier(a, a2, b)
    # the other pages are kept
    for msg, to in ((rows(11), None),
                    ({"type": "row_history_updated", "row_history_entry": {}, "table_id": 11, "row_id": 1}, None),
                    ({"type": "force_view_refresh"}, {"page": "view", "slug": "pub"}),
                    ({"type": "dashboard_updated", "dashboard_id": 10}, None)):
        server.publish(msg, to)
        assert await a.recv() == msg
        assert await a2.recv() == msg
    await barrier(a, a2, b)


@pytest.mark.gen_test
async def test_revoke_without_matching_pages_sends_nothing(server, connect, barrier):
    a = await connect(user_id=1)
    await a.subscribe("table", table_id=11)
    assert server.revoke([1, 2, 99], "permissions-table-10") == 0
    await barrier(a)


# --- removed from a workspace --------------------------------------------------------------------

def member_removed(workspace_id, user_id):
    return {"type": "group_user_deleted", "id": 77, "workspace_id": workspace_id,
            "workspace_user": {"id": 77, "user_id": user_id, "permissions": "MEMBER"}}


@pytest.mark.gen_test
async def test_group_user_deleted_drops_the_removed_users_pages_of_that_workspace(server, connect, barrier):
    server.directory.add_member(2, 2)  # user 2 is also in workspace 2 (table 20)
    removed = await connect(user_id=2)
    stays = await connect(user_id=1)
    outsider = await connect(user_id=4)  # workspace 2 only
    await removed.subscribe("table", table_id=10)
    await removed.subscribe("row", table_id=10, row_id=5)
    await removed.subscribe("table", table_id=11)
    await removed.subscribe("table", table_id=20)
    await removed.subscribe("view", slug="pub")
    await stays.subscribe("table", table_id=10)

    msg = member_removed(1, 2)
    server.publish(msg)
    got = [await removed.recv() for _ in range(4)]
    assert msg in got  # the removed user still receives the message
    assert as_set(*[m for m in got if m != msg]) == as_set(
        discard("table", table_id=10), discard("row", table_id=10, row_id=5), discard("table", table_id=11))
    assert await stays.recv() == msg
    await barrier(removed, stays, outsider)

    # pages of other workspaces and public views are kept; the remaining member keeps table 10
    server.publish(rows(20))
    assert await removed.recv() == rows(20)
    server.publish(rows(10))
    assert await stays.recv() == rows(10)
    server.publish({"type": "force_view_refresh"}, {"page": "view", "slug": "pub"})
    assert await removed.recv() == {"type": "force_view_refresh"}
    await barrier(removed, stays, outsider)

    # the directory is updated: no longer a member, may not subscribe again
    assert 2 not in server.directory.workspace_members(1)
    await removed.send({"page": "table", "table_id": 10})
    server.publish({"type": "group_updated", "workspace_id": 1, "workspace": {"id": 1}})
    assert (await stays.recv())["type"] == "group_updated"
    await barrier(removed, stays, outsider)


# --- table deleted -------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_table_deleted_drops_its_pages_for_every_subscriber(server, connect, barrier):
    a = await connect(user_id=1)
    b = await connect(user_id=2)
    outsider = await connect(user_id=4)
    for c in (a, b):
        await c.subscribe("table", table_id=10)
        await c.subscribe("row", table_id=10, row_id=1)
    await a.subscribe("table", table_id=11)
    await outsider.subscribe("table", table_id=20)

    msg = {"type": "table_deleted", "database_id": 1, "table_id": 10}
    server.publish(msg)
    expected = as_set(msg, discard("table", table_id=10), discard("row", table_id=10, row_id=1))
    assert await recv_set(a, 3) == expected
    assert await recv_set(b, 3) == expected
    await barrier(a, b, outsider)
    assert "table-10" not in server.hub.groups and "table-10-row-1" not in server.hub.groups

    server.publish(rows(11))
    assert await a.recv() == rows(11)
    await a.send({"page": "table", "table_id": 10})  # the table is gone from the directory
    await barrier(a, b, outsider)
    assert server.directory.table_workspace(10) is None


# --- force disconnect ----------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_force_disconnect_closes_every_connection_but_the_spared(server, connect, barrier):
    a1 = await connect(user_id=1)
    a2 = await connect(user_id=1)
    spared = await connect(user_id=1)
    b = await connect(user_id=2)
    c = await connect(user_id=3)
    await a1.subscribe("table", table_id=10)

    assert server.disconnect([1, 3], ignore_web_socket_ids=[spared.web_socket_id]) == 3
    for client in (a1, a2, c):
        assert await client.recv() == {"type": "force_disconnect"}
        assert await client.expect_close() == closecodes.FORCE_DISCONNECT == 4003
    await barrier(spared, b)
    await wait_until(lambda: len(server.hub.connections) == 2)
    assert set(server.hub.users) == {1, 2}
    assert "table-10" not in server.hub.groups


@pytest.mark.gen_test
async def test_force_disconnect_of_unknown_user_does_nothing(server, connect, barrier):
    a = await connect(user_id=1)
    assert server.disconnect([99]) == 0
    await barrier(a)


# --- closing -------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_closing_drops_subscriptions_silently(server, connect, barrier):
    a = await connect(user_id=1)
    same_user = await connect(user_id=1)
    for c in (a, same_user):
        await c.subscribe("table", table_id=10)
        await c.subscribe("row", table_id=10, row_id=1)
    a.close()
    await wait_until(lambda: len(server.hub.connections) == 1)
    assert [len(server.hub.groups[g]) for g in ("table-10", "table-10-row-1")] == [1, 1]
    await barrier(same_user)  # no page_discard reached anyone
    server.publish(rows(10))
    assert await same_user.recv() == rows(10)
    same_user.close()
    await wait_until(lambda: not server.hub.connections)
    assert server.hub.groups == {}


# --- nothing after the close frame (RFC 6455 §5.5.1), seen on the raw socket -----------------------

class RawClient:
    """A WebSocket client on a bare TCP stream that sees every frame, even after a close frame."""

    def __init__(self, stream):
        self.stream = stream

    @classmethod
    async def connect(cls, port, token):
        stream = await TCPClient().connect("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.write((f"GET /ws/core/?jwt_token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                            f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await stream.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(stream)

    async def frame(self):
        b0, b1 = await self.stream.read_bytes(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.stream.read_bytes(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.stream.read_bytes(8))
        return b0 & 0x0F, await self.stream.read_bytes(n) if n else b""

    async def recv(self):
        opcode, payload = await self.frame()
        assert opcode == 0x1, (opcode, payload)
        return ujson.loads(payload)

    async def close_and_rest(self):
        """Answer the server's close frame, then return every byte the server sent after it."""
        mask = os.urandom(4)
        self.stream.write(bytes((0x88, 0x80 | 2)) + mask + bytes(a ^ b for a, b in zip(b"\x03\xe8", mask)))
        return await self.stream.read_until_close()


async def read_until_close_frame(raw):
    frames = []
    while True:
        opcode, payload = await raw.frame()
        if opcode == 0x8:
            return frames, struct.unpack("!H", payload[:2])[0]
        frames.append(ujson.loads(payload))


@pytest.mark.gen_test
async def test_nothing_is_sent_after_the_force_disconnect_close_frame(server, http_server, http_port, connect, barrier):
    raw = await RawClient.connect(http_port, make_token(1))
    assert (await raw.recv())["success"] is True
    other = await connect(user_id=2)
    server.publish({"type": "user_data_updated", "n": 1}, {"user_ids": [1]})
    server.disconnect([1])
    # published after the disconnect, in the same loop iteration: must not follow the close frame
    server.publish({"type": "user_data_updated", "n": 2}, {"user_ids": [1, 2]})
    server.publish({"type": "test_marker", "n": 0}, {"all_users": True})
    frames, code = await read_until_close_frame(raw)
    assert frames == [{"type": "user_data_updated", "n": 1}, {"type": "force_disconnect"}]
    assert code == 4003
    assert await raw.close_and_rest() == b""
    assert await other.recv() == {"type": "user_data_updated", "n": 2}
    assert await other.recv() == {"type": "test_marker", "n": 0}
    await barrier(other)


@pytest.mark.rt_settings(max_subscriptions=1)
@pytest.mark.gen_test
async def test_nothing_is_sent_after_a_limit_close_frame(server, http_server, http_port):
    raw = await RawClient.connect(http_port, make_token(1))
    assert (await raw.recv())["success"] is True
    raw.stream.write(_masked({"page": "table", "table_id": 10}))
    assert (await raw.recv())["type"] == "page_add"
    raw.stream.write(_masked({"page": "table", "table_id": 11}))  # over the limit: 4008
    frames, code = await read_until_close_frame(raw)
    assert frames == [] and code == closecodes.POLICY_VIOLATION
    # the server has sent its close frame and waits for ours: the connection is still open
    # on the server's side, but it must not be in any audience any more
    server.publish(rows(10))
    server.publish({"type": "test_marker"}, {"all_users": True})
    assert await raw.close_and_rest() == b""


def _masked(obj):
    payload = ujson.dumps(obj).encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# --- events that keep subscriptions and the directory current ---------------------------------------

@pytest.mark.gen_test
async def test_user_permanently_deleted_revokes_every_table_page(server, connect, barrier):
    gone = await connect(user_id=2)
    stays = await connect(user_id=1)
    for c in (gone, stays):
        await c.subscribe("table", table_id=10)
        await c.subscribe("row", table_id=11, row_id=5)
    msg = {"type": "user_permanently_deleted", "user_id": 2}
    server.publish(msg)
    assert await gone.recv() == msg
    assert await recv_set(gone, 2) == as_set(discard("table", table_id=10),
                                             discard("row", table_id=11, row_id=5))
    assert await stays.recv() == msg
    server.publish(rows(10))
    assert await stays.recv() == rows(10)
    await barrier(gone, stays)
    assert 2 not in server.directory.workspace_members(1)


@pytest.mark.gen_test
async def test_table_created_for_an_explicit_workspace_joins_the_directory(server, connect, barrier):
    member = await connect(user_id=4)  # workspace 2
    outsider = await connect(user_id=1)
    created = {"type": "table_created", "table": {"id": 30, "name": "New", "database_id": 5}}
    server.publish(created, {"workspace_id": 2})
    assert await member.recv() == created
    await barrier(member, outsider)
    assert server.directory.table_workspace(30) == 2
    await member.subscribe("table", table_id=30)
    await outsider.send({"page": "table", "table_id": 30})
    await barrier(member, outsider)  # refused: no page_add for the non-member


@pytest.mark.gen_test
async def test_table_deleted_drops_its_public_view_pages(server, connect, barrier):
    anon = await connect(token="anonymous")
    await anon.subscribe("view", slug="pub")  # a public view of table 10
    deleted = {"type": "table_deleted", "database_id": 1, "table_id": 10}
    server.publish(deleted)
    assert await anon.recv() == discard("view", slug="pub", token=None)
    await barrier(anon)
    await anon.send({"page": "view", "slug": "pub"})
    await barrier(anon)  # the view is gone from the directory too


@pytest.mark.gen_test
@pytest.mark.rt_settings(allow_anonymous=False)
@pytest.mark.rt_server(authenticator=lambda token: __import__("tornado_rt").Principal(None))
async def test_authenticator_answering_anonymous_obeys_allow_anonymous(connect):
    client = await connect(token="whatever", authenticate=False)
    assert await client.recv() == {"type": "authentication", "success": False, "web_socket_id": None}
    assert await client.closed() == closecodes.AUTHENTICATION_FAILED
