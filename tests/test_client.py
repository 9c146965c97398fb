"""tornado_rt.client against a real ``tornado-rt serve`` subprocess: the publishers (sync and
asyncio) and the reconnecting Subscriber (restart, force disconnect, bad tokens)."""
import asyncio
import itertools
import os
import socket

import pytest
from tornado.ioloop import IOLoop

from standalone import API_KEY, SECRET, ServeProcess, make_token
from tornado_rt.client import (ApiError, AsyncPublisher, AuthenticationFailed, ConnectionFailed, Positions,
                               Publisher, SubscribeTimeout, Subscriber, page_key)

# --dev seeds the directory: workspace 1 = [user 1], table 1 in workspace 1.
SERVE = ["serve", "--dev", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY]
FAST = dict(min_delay=0.02, max_delay=0.2, subscribe_timeout=10)
_markers = itertools.count(1)


def rows_created(row_id, table_id=1):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": row_id}], "metadata": {},
            "before_row_id": None}


def published(answer):
    """``published`` of a publish answer, which also says how many connections got it: the
    module's server is shared, so a previous test's connection may still be counted here (the
    exact counts are tested in tests/test_delivered.py)."""
    assert set(answer) == {"published", "delivered"} and isinstance(answer["delivered"], int), answer
    return answer["published"]


@pytest.fixture(scope="module")
def rt():
    proc = ServeProcess(SERVE)
    yield proc
    assert proc.stop() == 0, proc.output()


async def barrier(publisher, *subscribers):
    """A marker to everybody must be the next message of each subscriber."""
    marker = {"type": "user_data_updated", "user_data": {"marker": next(_markers)}}
    answer = await publisher.publish(marker, to={"all_users": True})
    assert published(answer) == 1, answer
    for sub in subscribers:
        got = await sub.receive(10)
        assert got == marker, f"expected nothing before the marker, got {got}"


class States:
    """Records the states a Subscriber goes through; lets a test wait for the n-th one."""

    def __init__(self):
        self.seen = []
        self.changed = asyncio.Condition()

    async def __call__(self, state, info):
        async with self.changed:
            self.seen.append(state)
            self.changed.notify_all()

    async def reached(self, state, count):
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self.seen.count(state) >= count), 30)


def in_thread(fn, *args, **kwargs):
    return IOLoop.current().run_in_executor(None, lambda: fn(*args, **kwargs))


# --- publishers ---------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_sync_publisher_publishes_over_one_kept_alive_connection(rt):
    async with Subscriber(rt.ws_url, make_token(1), **FAST) as sub:
        await sub.subscribe("table", table_id=1)
        with Publisher(rt.base, API_KEY) as pub:
            assert published(await in_thread(pub.publish, rows_created(1))) == 1
            first = pub._idle[0].sock
            assert published(await in_thread(pub.publish, rows_created(2))) == 1
            assert len(pub._idle) == 1 and pub._idle[0].sock is first  # reused, not reopened
            assert published(await in_thread(pub.publish_individual, {1: {"type": "user_data_updated",
                                                                          "user_data": {"n": 3}}})) == 1
        assert await sub.receive(10) == rows_created(1)
        assert await sub.receive(10) == rows_created(2)
        assert await sub.receive(10) == {"type": "user_data_updated", "user_data": {"n": 3}}


def test_a_forked_process_never_shares_the_parents_kept_alive_socket(rt):
    """A Celery prefork worker inherits the publisher: it must open its own connection."""
    with Publisher(rt.base, API_KEY) as pub:
        assert published(pub.publish(rows_created(1))) == 1
        inherited = pub._idle[0].sock.getsockname()  # the parent's connection, by its local port
        pid = os.fork()
        if pid == 0:  # the child: publish, then report whether a new socket carried it
            try:
                ok = (published(pub.publish(rows_created(2))) == 1
                      and pub._idle[0].sock.getsockname() != inherited)
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert published(pub.publish(rows_created(3))) == 1  # the parent's connection still works
        assert pub._idle[0].sock.getsockname() == inherited


@pytest.mark.gen_test(timeout=30)
async def test_async_publisher_batch_is_one_request_in_order(rt):
    async with Subscriber(rt.ws_url, make_token(1), **FAST) as sub, AsyncPublisher(rt.base, API_KEY) as pub:
        await sub.subscribe("table", table_id=1)
        answer = await pub.publish_many([rows_created(1), {"message": rows_created(2)},
                                         {"message": {"type": "user_data_updated", "user_data": {}},
                                          "to": {"user_ids": [1]}}])
        assert published(answer) == 3, answer
        assert [await sub.receive(10) for _ in range(3)] == [
            rows_created(1), rows_created(2), {"type": "user_data_updated", "user_data": {}}]


@pytest.mark.gen_test(timeout=30)
async def test_ignore_web_socket_id_and_exclude_user_ids(rt):
    async with Subscriber(rt.ws_url, make_token(1), **FAST) as sub, AsyncPublisher(rt.base, API_KEY) as pub:
        await sub.subscribe("table", table_id=1)
        assert published(await pub.publish(rows_created(1), ignore_web_socket_id=sub.web_socket_id)) == 1
        assert published(await pub.publish(rows_created(2), exclude_user_ids=[1])) == 1
        sender = AsyncPublisher(rt.base, API_KEY, web_socket_id=sub.web_socket_id)  # the WebSocketId header
        assert published(await sender.publish(rows_created(3))) == 1
        await sender.close()
        await barrier(pub, sub)


@pytest.mark.gen_test(timeout=30)
async def test_a_400_raises_naming_the_field_and_publishes_nothing(rt):
    async with Subscriber(rt.ws_url, make_token(1), **FAST) as sub, AsyncPublisher(rt.base, API_KEY) as pub:
        await sub.subscribe("table", table_id=1)
        bad = {"type": "rows_created", "rows": []}
        with pytest.raises(ApiError) as info:
            await pub.publish_many([rows_created(1), bad])
        assert info.value.status == 400 and info.value.field == "[1].message.table_id"
        assert "[1].message.table_id" in str(info.value)
        with Publisher(rt.base, API_KEY) as sync:
            with pytest.raises(ApiError) as info:
                await in_thread(sync.publish, bad)
            assert info.value.status == 400 and info.value.field == "message.table_id"
            with pytest.raises(ApiError) as info:
                await in_thread(sync.revoke, [1], 7)
            assert info.value.status == 400 and info.value.field == "permission_group"
        await barrier(pub, sub)  # the valid first envelope of the refused batch was not published


@pytest.mark.gen_test(timeout=30)
async def test_wrong_api_key_is_a_401(rt):
    with pytest.raises(ApiError) as info:
        await in_thread(Publisher(rt.base, "wrong-key").publish, rows_created(1))
    assert info.value.status == 401
    pub = AsyncPublisher(rt.base, "wrong-key")
    with pytest.raises(ApiError) as info:
        await pub.disconnect([1])
    assert info.value.status == 401
    await pub.close()


def closed_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.mark.gen_test(timeout=30)
async def test_connection_refused_is_retried_then_reported_as_not_sent():
    url = f"http://127.0.0.1:{closed_port()}/"
    with pytest.raises(ConnectionFailed) as info:
        await in_thread(Publisher(url, API_KEY, retries=2, backoff=0.01).publish, rows_created(1))
    assert info.value.sent is False
    pub = AsyncPublisher(url, API_KEY, retries=2, backoff=0.01)
    with pytest.raises(ConnectionFailed) as info:
        await pub.publish(rows_created(1))
    assert info.value.sent is False


@pytest.mark.gen_test(timeout=60)
async def test_publisher_retries_until_the_server_is_back():
    """A refused connection is retried with backoff; a server started meanwhile gets the publish
    exactly once."""
    port = closed_port()
    pub = AsyncPublisher(f"http://127.0.0.1:{port}/", API_KEY, retries=60, backoff=0.05, max_backoff=0.2)
    pending = asyncio.ensure_future(pub.publish(rows_created(1)))
    proc = await in_thread(ServeProcess, ["serve", "--dev", "--port", str(port), "--jwt-secret", SECRET,
                                          "--api-key", API_KEY])
    try:
        assert await pending == {"published": 1, "delivered": 0}  # a fresh server: nobody connected
        assert (await pub.request("GET", "/api/stats"))["connections"] == 0
    finally:
        await pub.close()
        assert await proc.stopped() == 0


# --- subscriber ---------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_unsubscribe_stops_delivery_and_denied_subscribe_times_out(rt):
    async with Subscriber(rt.ws_url, make_token(1), **FAST) as sub, AsyncPublisher(rt.base, API_KEY) as pub:
        assert (await sub.subscribe("table", table_id=1))["parameters"] == {"table_id": 1}
        await sub.unsubscribe("table", table_id=1)
        assert sub.pages == []
        await pub.publish(rows_created(1))
        await barrier(pub, sub)
        with pytest.raises(SubscribeTimeout):
            await sub.subscribe("table", table_id=999, timeout=0.5)  # not in the directory: no answer
        assert sub.pages == []


@pytest.mark.gen_test(timeout=30)
async def test_revoke_yields_page_discard_and_forgets_the_page(rt):
    async with Subscriber(rt.ws_url, make_token(1), **FAST) as sub, AsyncPublisher(rt.base, API_KEY) as pub:
        await sub.subscribe("table", table_id=1)
        assert await pub.revoke([1], "permissions-table-1") == {"discarded": 1}
        assert await sub.receive(10) == {"type": "page_discard", "page": "table", "parameters": {"table_id": 1}}
        assert sub.pages == []


@pytest.mark.gen_test(timeout=90)
async def test_reconnects_after_a_server_restart_and_resubscribes():
    proc = ServeProcess(SERVE)
    port = proc.port
    states = States()
    sub = Subscriber(proc.ws_url, make_token(1), on_state=states, **FAST)
    try:
        await sub.connect()
        await sub.subscribe("table", table_id=1)
        first_id = sub.web_socket_id
        async with AsyncPublisher(proc.base, API_KEY) as pub:
            await pub.publish(rows_created(1))
        assert await sub.receive(10) == rows_created(1)

        assert await proc.stopped() == 0  # closes the WebSocket with 1001
        proc = await in_thread(ServeProcess, SERVE[:3] + [str(port)] + SERVE[4:])
        await states.reached("open", 2)
        await sub.ready(timeout=30)  # reconnected and table 1 subscribed again
        assert sub.close_code == 1001 and sub.connections == 2
        assert sub.web_socket_id and sub.web_socket_id != first_id
        seen = states.seen
        assert seen[:2] == ["connecting", "open"] and seen[-1] == "open" and "reconnecting" in seen
        async with AsyncPublisher(proc.base, API_KEY) as pub:
            assert await pub.publish(rows_created(2)) == {"published": 1, "delivered": 1}  # a fresh server: sub only
            assert await sub.receive(10) == rows_created(2)  # nothing from before, no duplicates
            await barrier(pub, sub)
    finally:
        await sub.close()
        assert sub.state == "closed"
        assert await proc.stopped() == 0, proc.output()


@pytest.mark.gen_test(timeout=30)
async def test_force_disconnect_with_a_fixed_token_is_final(rt):
    states = []
    sub = Subscriber(rt.ws_url, make_token(5), on_state=lambda state, info: states.append(state), **FAST)
    await sub.connect()
    async with AsyncPublisher(rt.base, API_KEY) as pub:
        assert await pub.disconnect([5]) == {"disconnected": 1}
        assert [m async for m in sub] == [{"type": "force_disconnect"}]  # then the iteration ends
        await sub.wait_closed()  # the connection loop is over: nothing can reconnect
        assert states == ["connecting", "open", "closed"]
        assert sub.state == "closed" and sub.close_code == 4003 and sub.connections == 1
        with pytest.raises(ConnectionFailed, match="closed"):
            await sub.subscribe("table", table_id=1)  # at once, not after the subscribe timeout
        assert (await pub.request("GET", "/api/stats"))["connections"] == 0


@pytest.mark.gen_test(timeout=30)
async def test_force_disconnect_reconnects_when_the_token_function_gives_a_new_token(rt):
    calls = []

    async def token():
        calls.append(1)
        return make_token(6, jti=str(len(calls)))  # a different token on every call

    states = States()
    sub = Subscriber(rt.ws_url, token, on_state=states, **FAST)
    await sub.connect()
    first_id = sub.web_socket_id
    async with AsyncPublisher(rt.base, API_KEY) as pub:
        assert await pub.disconnect([6]) == {"disconnected": 1}
        assert await sub.receive(10) == {"type": "force_disconnect"}
        await states.reached("open", 2)
        assert sub.connections == 2 and sub.web_socket_id != first_id and len(calls) == 2
        await pub.publish({"type": "user_data_updated", "user_data": {"x": 1}}, to={"user_ids": [6]})
        assert await sub.receive(10) == {"type": "user_data_updated", "user_data": {"x": 1}}
    await sub.close()


@pytest.mark.gen_test(timeout=30)
async def test_authentication_failure_with_a_fixed_token_is_final(rt):
    states = []
    sub = Subscriber(rt.ws_url, make_token(1, secret="not-the-secret-but-long-enough-for-hs256"),
                     on_state=lambda state, info: states.append(state), **FAST)
    with pytest.raises(AuthenticationFailed):
        await sub.connect()
    await sub.wait_closed()
    assert states == ["connecting", "closed"] and sub.close_code == 4001 and sub.connections == 0
    assert [m async for m in sub] == []


@pytest.mark.gen_test(timeout=30)
async def test_authentication_failure_is_retried_once_with_a_new_token(rt):
    tokens = iter([make_token(1, secret="a-stale-secret-that-is-long-enough-for-hs256"), make_token(1)])
    sub = Subscriber(rt.ws_url, lambda: next(tokens), **FAST)  # a sync token function
    await sub.connect()
    assert sub.connections == 1 and sub.web_socket_id
    await sub.subscribe("table", table_id=1)
    await sub.close()

    calls = []

    def always_bad():
        calls.append(1)
        return make_token(1, secret="a-wrong-secret-that-is-long-enough-for-hs256", jti=str(len(calls)))  # new, and refused, every time

    sub = Subscriber(rt.ws_url, always_bad, **FAST)
    with pytest.raises(AuthenticationFailed):
        await sub.connect()
    await sub.wait_closed()
    assert len(calls) == 2 and sub.close_code == 4001  # one new token tried, then no loop


@pytest.mark.gen_test(timeout=30)
async def test_a_token_function_of_the_wrong_type_is_logged_without_the_token(rt, caplog):
    # bytes instead of str: refused by type, and the log line names the type, never the value
    # (which is usually the token itself); the next call's string token connects.
    good = make_token(1)
    tokens = iter([good.encode(), good])
    sub = Subscriber(rt.ws_url, lambda: next(tokens), **FAST)
    with caplog.at_level("WARNING", logger="tornado_rt"):
        await sub.connect()
    assert sub.connections == 1
    assert "the token function failed: the token function must return a non-empty string, got bytes" in caplog.text
    assert good not in caplog.text and good[:20] not in caplog.text
    await sub.close()


@pytest.mark.gen_test(timeout=30)
async def test_refused_upgrade_is_final():
    proc = ServeProcess(["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY,
                         "--allowed-origin", "https://app.example.com"])
    try:
        sub = Subscriber(proc.ws_url, make_token(1), origin="https://evil.example.com", **FAST)
        with pytest.raises(ConnectionFailed, match="403"):
            await sub.connect()
        assert sub.state == "closed"
    finally:
        assert await proc.stopped() == 0


# --- the recovery hook, without sockets ---------------------------------------------------------------

def test_positions_follow_page_add_and_messages():
    table = page_key("table", {"table_id": 1})
    row = page_key("row", {"table_id": 1, "row_id": 2})
    pages = {table: {"table_id": 1}, row: {"table_id": 1, "row_id": 2}}
    positions = Positions()
    positions.on_message(rows_created(1), pages)  # no position: nothing kept
    assert positions.since(table) is None
    positions.on_page_add(table, {"type": "page_add", "position": {"epoch": "e1", "offset": 4}})
    positions.on_message({**rows_created(1), "position": {"epoch": "e1", "offset": 5}}, pages)
    assert positions.since(table) == {"epoch": "e1", "offset": 5}
    positions.on_message({"type": "row_comment", "table_id": 1, "row_id": 2,
                          "position": {"epoch": "e2", "offset": 9}}, pages)  # found by its parameters
    assert positions.since(row) == {"epoch": "e2", "offset": 9}
    positions.on_message({"type": "x", "position": {"epoch": "e1", "offset": True}}, pages)  # not a position
    assert positions.since(table) == {"epoch": "e1", "offset": 5}
    positions.forget(table)
    assert positions.since(table) is None
