"""docs/protocol.md §2: client -> server messages (page, remove_page, garbage, limits)."""
import pytest
import ujson

from tornado_rt import closecodes

ROWS = {"type": "rows_created", "table_id": 10, "rows": [{"id": 1}], "metadata": {}, "before_row_id": None}


def page_add(page, **params):
    return {"type": "page_add", "page": page, "parameters": params}


def page_discard(page, **params):
    return {"type": "page_discard", "page": page, "parameters": params}


# --- page ----------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_page_replies_page_add_with_declared_parameters(connect, barrier):
    a = await connect(user_id=1)
    await a.send({"page": "row", "table_id": 10, "row_id": 3})
    assert await a.recv() == page_add("row", table_id=10, row_id=3)
    await barrier(a)


@pytest.mark.gen_test
async def test_page_add_echoes_only_declared_parameters_as_sent(server, connect, barrier):
    a = await connect(user_id=1)
    await a.send({"page": "table", "table_id": "10", "extra": "dropped", "row_id": 5})
    assert await a.recv() == page_add("table", table_id="10")
    # "10" and 10 name the same table: the subscription receives table 10's messages
    server.publish(ROWS)
    assert await a.recv() == ROWS
    await barrier(a)


@pytest.mark.gen_test
async def test_missing_optional_parameter_is_null(connect, barrier):
    anon = await connect(token="anonymous")
    await anon.send({"page": "view", "slug": "pub"})
    assert await anon.recv() == page_add("view", slug="pub", token=None)
    await barrier(anon)


@pytest.mark.gen_test
async def test_resubscribe_resends_page_add_but_delivers_one_copy(server, connect, barrier):
    a = await connect(user_id=1)
    await a.subscribe("table", table_id=10)
    await a.subscribe("table", table_id=10)
    await a.send({"page": "table", "table_id": "10"})  # same page, spelled differently
    assert await a.recv() == page_add("table", table_id="10")
    assert len(server.hub.groups["table-10"]) == 1
    server.publish(ROWS)
    assert await a.recv() == ROWS
    await barrier(a)


@pytest.mark.gen_test
async def test_unknown_page_gets_no_reply(connect, barrier):
    a = await connect(user_id=1)
    await a.send({"page": "nonexistent", "table_id": 10})
    await barrier(a)
    await a.subscribe("table", table_id=10)  # still usable


@pytest.mark.gen_test
async def test_denied_page_gets_no_reply_and_no_messages(server, connect, barrier):
    outsider = await connect(user_id=4)  # member of workspace 2 only; table 10 is in workspace 1
    await outsider.send({"page": "table", "table_id": 10})
    await outsider.send({"page": "row", "table_id": 10, "row_id": 1})
    await outsider.send({"page": "table", "table_id": 999})  # unknown table
    await barrier(outsider)
    server.publish(ROWS)
    await barrier(outsider)
    assert "table-10" not in server.hub.groups


@pytest.mark.gen_test
async def test_missing_required_parameter_gets_no_reply(server, connect, barrier):
    a = await connect(user_id=1)
    await a.send({"page": "table"})
    await a.send({"page": "table", "table_id": None})
    await a.send({"page": "row", "table_id": 10})
    await a.send({"page": "view", "token": "x"})
    await barrier(a)
    assert server.hub.groups == {}


# --- remove_page ---------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_remove_page_discards_and_stops_delivery(server, connect, barrier):
    a = await connect(user_id=1)
    await a.subscribe("table", table_id=10)
    await a.send({"remove_page": "table", "table_id": 10, "extra": 1})
    assert await a.recv() == page_discard("table", table_id=10)
    server.publish(ROWS)
    await barrier(a)


@pytest.mark.gen_test
async def test_remove_page_matches_the_page_however_its_ids_are_spelled(server, connect, barrier):
    a = await connect(user_id=1)
    await a.subscribe("row", table_id=10, row_id=3)
    await a.send({"remove_page": "row", "table_id": "10", "row_id": "3"})
    assert await a.recv() == page_discard("row", table_id="10", row_id="3")
    assert server.hub.groups == {}
    server.publish({"type": "row_history_updated", "row_history_entry": {}, "table_id": 10, "row_id": 3})
    await barrier(a)


@pytest.mark.gen_test
async def test_remove_page_replies_even_when_not_subscribed(connect, barrier):
    a = await connect(user_id=4)
    await a.send({"remove_page": "table", "table_id": 10})  # never subscribed (and not allowed)
    assert await a.recv() == page_discard("table", table_id=10)
    await a.send({"remove_page": "view", "slug": "nope"})
    assert await a.recv() == page_discard("view", slug="nope", token=None)
    await barrier(a)


@pytest.mark.gen_test
async def test_remove_unknown_page_gets_no_reply(connect, barrier):
    a = await connect(user_id=1)
    await a.send({"remove_page": "nonexistent", "table_id": 10})
    await a.send({"remove_page": 5})
    await barrier(a)


@pytest.mark.gen_test
async def test_remove_page_keeps_other_pages(server, connect, barrier):
    a = await connect(user_id=1)
    await a.subscribe("table", table_id=10)
    await a.subscribe("table", table_id=11)
    await a.send({"remove_page": "table", "table_id": 11})
    assert await a.recv() == page_discard("table", table_id=11)
    server.publish(ROWS)
    assert await a.recv() == ROWS
    server.publish({**ROWS, "table_id": 11})
    await barrier(a)


@pytest.mark.gen_test
async def test_page_and_remove_page_in_one_frame(server, connect, barrier):
    a = await connect(user_id=1)
    # remove_page comes first in the text: page is still handled first
    await a.send('{"remove_page": "table", "page": "table", "table_id": 10}')
    assert await a.recv() == page_add("table", table_id=10)
    assert await a.recv() == page_discard("table", table_id=10)
    server.publish(ROWS)
    await barrier(a)
    # different pages in one frame: subscribed to the first, discarded the second
    await a.subscribe("table", table_id=11)
    await a.send({"page": "table", "table_id": 10, "remove_page": "dashboard", "dashboard_id": 1})
    assert await a.recv() == page_add("table", table_id=10)
    assert await a.recv() == page_discard("dashboard", dashboard_id=1)
    server.publish(ROWS)
    assert await a.recv() == ROWS


@pytest.mark.gen_test
async def test_denied_page_with_remove_page_in_one_frame_replies_discard_only(connect, barrier):
    a = await connect(user_id=4)
    await a.send({"page": "table", "remove_page": "table", "table_id": 10})
    assert await a.recv() == page_discard("table", table_id=10)
    await barrier(a)


# --- garbage -------------------------------------------------------------------------------------

GARBAGE = {
    "not_json": "this is not json",
    "truncated_json": '{"page": "table", "table_id": 10',
    "empty": "",
    "json_array": '[{"page": "table", "table_id": 10}]',
    "json_number": "42",
    "json_string": '"page"',
    "json_null": "null",
    "json_true": "true",
    "deeply_nested": "[" * 30000 + "]" * 30000,
    "binary_frame": ujson.dumps({"page": "table", "table_id": 10}).encode(),
    "object_without_keys": '{"type": "page_add", "table_id": 10}',
    "page_not_a_string": '{"page": {"name": "table"}, "table_id": 10}',
    "page_list": '{"page": ["table"], "table_id": 10}',
    "page_null": '{"page": null, "table_id": 10}',
    "table_id_object": '{"page": "table", "table_id": {}}',
    "table_id_list": '{"page": "table", "table_id": [10]}',
    "table_id_bool": '{"page": "table", "table_id": true}',
    "table_id_float": '{"page": "table", "table_id": 10.0}',
    "table_id_huge": '{"page": "table", "table_id": 100000000000000000000000000000}',
    "table_id_text": '{"page": "table", "table_id": "ten"}',
    "row_id_object": '{"page": "row", "table_id": 10, "row_id": {"id": 1}}',
    "slug_number": '{"page": "view", "slug": 5}',
    "slug_object": '{"page": "view", "slug": {}}',
    "token_object": '{"page": "view", "slug": "secret-view", "token": {"t": "s3cret"}}',
    "dashboard_id_object": '{"page": "dashboard", "dashboard_id": {}}',
    # numbers a JSON reply cannot carry back (the reply would hold Infinity / NaN, not JSON)
    "remove_page_table_id_overflow": '{"remove_page": "table", "table_id": 1e999}',
    "remove_page_row_id_nested_overflow": '{"remove_page": "row", "table_id": 10, "row_id": [-1e999]}',
    "remove_page_table_id_nan": '{"remove_page": "table", "table_id": NaN}',
    "page_and_remove_page_overflow": '{"page": "table", "remove_page": "table", "table_id": 1e400}',
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
@pytest.mark.gen_test
async def test_garbage_is_ignored_and_connection_stays_usable(kind, server, connect, barrier):
    a = await connect(user_id=1)
    await a.send(GARBAGE[kind])
    await barrier(a)
    await a.subscribe("table", table_id=10)
    server.publish(ROWS)
    assert await a.recv() == ROWS
    assert list(a_pages(server)) == ["table-10"]


def a_pages(server):
    (conn,) = server.hub.connections.values()
    return conn.pages


@pytest.mark.gen_test
async def test_garbage_remove_page_parameters_do_not_unsubscribe(server, connect, barrier):
    a = await connect(user_id=1)
    await a.subscribe("table", table_id=10)
    await a.send('{"remove_page": "table", "table_id": {}}')
    assert await a.recv() == page_discard("table", table_id={})
    server.publish(ROWS)
    assert await a.recv() == ROWS
    await barrier(a)


# --- limits --------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_message_over_64_KiB_closes_with_1009(server, connect, barrier):
    a = await connect(user_id=1)
    other = await connect(user_id=2)
    frame = '{"page": "table", "table_id": 10, "pad": "%s"}'
    exact = frame % ("x" * (64 * 1024 - len(frame % "")))
    assert len(exact) == 64 * 1024
    await a.send(exact)  # exactly the limit: handled
    assert await a.recv() == page_add("table", table_id=10)
    await a.send(frame % ("x" * (64 * 1024 + 1 - len(frame % ""))))
    assert await a.expect_close() == closecodes.MESSAGE_TOO_BIG == 1009
    await barrier(other)  # only that connection is closed


@pytest.mark.rt_settings(max_subscriptions=2)
@pytest.mark.gen_test
async def test_too_many_subscriptions_closes_with_4008(server, connect, barrier):
    a = await connect(user_id=1)
    other = await connect(user_id=2)
    await a.subscribe("table", table_id=10)
    await a.subscribe("table", table_id=11)
    await a.subscribe("table", table_id=10)  # re-subscribing is not a new subscription
    await a.send({"page": "row", "table_id": 10, "row_id": 1})
    assert await a.expect_close() == closecodes.POLICY_VIOLATION == 4008
    await barrier(other)


@pytest.mark.rt_settings(max_incoming_rate=0.001, max_incoming_burst=3)
@pytest.mark.gen_test
async def test_incoming_rate_limit_closes_with_4008(server, connect, barrier):
    a = await connect(user_id=1)
    other = await connect(user_id=2)
    for table_id in (10, 11, 10):
        await a.subscribe("table", table_id=table_id)
    await a.send({"page": "table", "table_id": 11})
    assert await a.expect_close() == closecodes.POLICY_VIOLATION
    await barrier(other)
