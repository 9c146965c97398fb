"""docs/protocol.md §5, rules 1-4: who receives a message, exactly once, in publish order."""
import pytest

from tornado_rt import PublishError


def rows(table_id, n=0):
    return {"type": "rows_created", "table_id": table_id, "rows": [{"id": n}], "metadata": {}, "before_row_id": None}


def group_updated(workspace_id):
    return {"type": "group_updated", "workspace_id": workspace_id, "workspace": {"id": workspace_id}}


# --- rule 1: isolation ---------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_workspace_isolation(server, connect, barrier):
    ws1 = [await connect(user_id=u) for u in (1, 2, 3)]
    ws2 = await connect(user_id=4)
    nowhere = await connect(user_id=5)
    anon = await connect(token="anonymous")
    server.publish(group_updated(1))
    for c in ws1:
        assert await c.recv() == group_updated(1)
    await barrier(*ws1, ws2, nowhere, anon)
    server.publish(group_updated(2))
    assert await ws2.recv() == group_updated(2)
    await barrier(*ws1, ws2, nowhere, anon)
    server.publish(group_updated(3))  # a workspace nobody is in
    await barrier(*ws1, ws2, nowhere, anon)


@pytest.mark.gen_test
async def test_page_isolation(server, connect, barrier):
    t10 = await connect(user_id=1)
    t11 = await connect(user_id=2)
    row = await connect(user_id=3)
    t20 = await connect(user_id=4)
    view = await connect(token="anonymous")
    await t10.subscribe("table", table_id=10)
    await t11.subscribe("table", table_id=11)
    await row.subscribe("row", table_id=10, row_id=1)
    await t20.subscribe("table", table_id=20)
    await view.subscribe("view", slug="pub")  # a view of table 10: not the table page
    everyone = (t10, t11, row, t20, view)
    server.publish(rows(10))
    assert await t10.recv() == rows(10)
    await barrier(*everyone)
    server.publish(rows(11))
    assert await t11.recv() == rows(11)
    await barrier(*everyone)
    server.publish(rows(20))
    assert await t20.recv() == rows(20)
    await barrier(*everyone)
    history = {"type": "row_history_updated", "row_history_entry": {}, "table_id": 10, "row_id": 1}
    server.publish(history)
    assert await row.recv() == history
    await barrier(*everyone)
    server.publish({"type": "force_view_refresh"}, {"page": "view", "slug": "pub"})
    assert await view.recv() == {"type": "force_view_refresh"}
    await barrier(*everyone)


@pytest.mark.gen_test
async def test_user_isolation(server, connect, barrier):
    a1 = await connect(user_id=1)
    a2 = await connect(user_id=1)
    b = await connect(user_id=2)
    anon = await connect(token="anonymous")
    msg = {"type": "notifications_created", "notifications": [1]}
    server.publish(msg, {"user_ids": [1]})
    assert await a1.recv() == msg
    assert await a2.recv() == msg
    await barrier(a1, a2, b, anon)
    server.publish(msg, {"user_ids": ["2"]})  # ids compare canonically
    assert await b.recv() == msg
    await barrier(a1, a2, b, anon)


@pytest.mark.gen_test
async def test_membership_is_read_at_publish_time(server, connect, barrier):
    a = await connect(user_id=5)
    server.publish(group_updated(1))
    await barrier(a)
    server.directory.add_member(1, 5)
    server.publish(group_updated(1))
    assert await a.recv() == group_updated(1)
    server.directory.remove_member(1, 5)
    server.publish(group_updated(1))
    await barrier(a)


# --- rule 2: sender and excluded users -----------------------------------------------------------

@pytest.mark.gen_test
async def test_ignore_web_socket_id_skips_only_the_sender(server, connect, barrier):
    sender = await connect(user_id=1)
    same_user = await connect(user_id=1)
    other = await connect(user_id=2)
    for c in (sender, same_user, other):
        await c.subscribe("table", table_id=10)
    server.publish(rows(10), ignore_web_socket_id=sender.web_socket_id)
    assert await same_user.recv() == rows(10)
    assert await other.recv() == rows(10)
    await barrier(sender, same_user, other)
    # the same for a workspace audience and a users audience
    server.publish(group_updated(1), ignore_web_socket_id=sender.web_socket_id)
    assert await same_user.recv() == group_updated(1)
    assert await other.recv() == group_updated(1)
    await barrier(sender, same_user, other)
    msg = {"type": "user_data_updated"}
    server.publish(msg, {"user_ids": [1]}, ignore_web_socket_id=same_user.web_socket_id)
    assert await sender.recv() == msg
    await barrier(sender, same_user, other)


@pytest.mark.gen_test
async def test_ignore_unknown_web_socket_id_skips_nobody(server, connect, barrier):
    a = await connect(user_id=1)
    await a.subscribe("table", table_id=10)
    server.publish(rows(10), ignore_web_socket_id="00000000-0000-4000-8000-000000000000")
    assert await a.recv() == rows(10)
    await barrier(a)


@pytest.mark.gen_test
async def test_ignore_web_socket_id_in_individual_payloads(server, connect, barrier):
    sender = await connect(user_id=1)
    same_user = await connect(user_id=1)
    other = await connect(user_id=2)
    m1, m2 = {"type": "user_data_updated", "for": 1}, {"type": "user_data_updated", "for": 2}
    server.publish_individual({1: m1, 2: m2}, ignore_web_socket_id=sender.web_socket_id)
    assert await same_user.recv() == m1
    assert await other.recv() == m2
    await barrier(sender, same_user, other)


@pytest.mark.gen_test
async def test_exclude_user_ids_skips_every_connection_of_those_users(server, connect, barrier):
    a1 = await connect(user_id=1)
    a2 = await connect(user_id=1)
    b = await connect(user_id=2)
    c = await connect(user_id=3)
    for client in (a1, a2, b, c):
        await client.subscribe("table", table_id=10)
    server.publish(rows(10), exclude_user_ids=[1, "3"])
    assert await b.recv() == rows(10)
    await barrier(a1, a2, b, c)
    server.publish(group_updated(1), exclude_user_ids=[2])
    for client in (a1, a2, c):
        assert await client.recv() == group_updated(1)
    await barrier(a1, a2, b, c)


@pytest.mark.gen_test
async def test_exclude_user_ids_combined_with_ignore(server, connect, barrier):
    a1 = await connect(user_id=1)
    a2 = await connect(user_id=1)
    b = await connect(user_id=2)
    c = await connect(user_id=3)
    server.publish(group_updated(1), ignore_web_socket_id=a1.web_socket_id, exclude_user_ids=[3])
    assert await a2.recv() == group_updated(1)
    assert await b.recv() == group_updated(1)
    await barrier(a1, a2, b, c)


# --- rule 3: one copy per connection ---------------------------------------------------------------

@pytest.mark.gen_test
async def test_one_copy_when_in_two_listed_workspaces(server, connect, barrier):
    server.directory.add_member(2, 1)  # user 1 is in workspaces 1 and 2
    a = await connect(user_id=1)
    d = await connect(user_id=4)
    msg = {"type": "user_data_updated"}
    server.publish(msg, {"workspace_ids": [1, 2]})
    assert await a.recv() == msg
    assert await d.recv() == msg
    await barrier(a, d)
    server.publish(msg, {"workspace_ids": [1, "1", 1]})
    assert await a.recv() == msg
    await barrier(a, d)


@pytest.mark.gen_test
async def test_one_copy_for_listed_users_named_twice(server, connect, barrier):
    a = await connect(user_id=1)
    msg = {"type": "user_data_updated"}
    server.publish(msg, {"user_ids": [1, "1", 1]})
    assert await a.recv() == msg
    await barrier(a)


@pytest.mark.gen_test
async def test_one_copy_for_the_member_who_is_also_the_extra_user(server, connect, barrier):
    a = await connect(user_id=2)  # already a member, and named as the added member
    msg = {"type": "group_user_added", "id": 1, "workspace_id": 1, "workspace_user": {"user_id": 2}}
    server.publish(msg)
    assert await a.recv() == msg
    await barrier(a)


@pytest.mark.gen_test
async def test_one_copy_of_a_users_workspaces_message(server, connect, barrier):
    server.directory.add_member(2, 2)  # user 2 shares workspace 1 with user 1 and workspace 2 with user 4
    server.directory.add_member(2, 1)
    a = await connect(user_id=1)
    msg = {"type": "user_updated", "user": {"id": 2, "username": "b", "first_name": "B"}}
    server.publish(msg)
    assert await a.recv() == msg
    await barrier(a)


@pytest.mark.gen_test
async def test_one_copy_per_connection_of_individual_payloads(server, connect, barrier):
    a1 = await connect(user_id=1)
    a2 = await connect(user_id=1)
    b = await connect(user_id=2)
    m1, m2 = {"type": "user_data_updated", "for": 1}, {"type": "user_data_updated", "for": 2}
    server.publish_individual({1: m1, 2: m2, 9: m2})
    assert await a1.recv() == m1
    assert await a2.recv() == m1
    assert await b.recv() == m2
    await barrier(a1, a2, b)


@pytest.mark.gen_test
async def test_individual_payloads_naming_a_user_twice_are_refused(server, connect, barrier):
    a = await connect(user_id=1)
    with pytest.raises(PublishError) as err:
        server.publish_individual({1: {"type": "user_data_updated", "n": 1},
                                   "1": {"type": "user_data_updated", "n": 2}})
    assert err.value.field == "individual.1" and "twice" in str(err.value)
    await barrier(a)


@pytest.mark.gen_test
async def test_one_copy_for_all_users(server, connect, barrier):
    a = await connect(user_id=1)
    await a.subscribe("table", table_id=10)
    anon = await connect(token="anonymous")
    msg = {"type": "user_data_updated"}
    server.publish(msg, {"all_users": True})
    assert await a.recv() == msg
    assert await anon.recv() == msg
    await barrier(a, anon)


# --- rule 4: order ---------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_publish_order_is_kept(server, connect, barrier):
    a = await connect(user_id=1)
    b = await connect(user_id=2)
    await a.subscribe("table", table_id=10)
    await b.subscribe("table", table_id=10)
    for n in range(200):
        server.publish(rows(10, n))
    for client in (a, b):
        assert [(await client.recv())["rows"][0]["id"] for _ in range(200)] == list(range(200))
    await barrier(a, b)


@pytest.mark.gen_test
async def test_order_is_kept_across_audiences_and_replies(server, connect, barrier):
    a = await connect(user_id=1)
    await a.subscribe("table", table_id=10)
    sent = []
    for n in range(60):
        msg = [rows(10, n), {**group_updated(1), "n": n}, {"type": "user_data_updated", "n": n}][n % 3]
        to = [None, None, {"user_ids": [1]}][n % 3]
        server.publish(msg, to)
        sent.append(msg)
    received = [await a.recv() for _ in range(60)]
    assert received == sent
    # a client's own request is answered in order with what was published before it
    server.publish(rows(10, 1000))
    await a.send({"page": "table", "table_id": 11})
    assert await a.recv() == rows(10, 1000)
    assert (await a.recv())["type"] == "page_add"
    await barrier(a)


@pytest.mark.gen_test
async def test_large_messages_are_delivered_whole_and_in_order(server, connect, barrier):
    a = await connect(user_id=1)
    await a.subscribe("table", table_id=10)
    sizes = [10, 200, 70000, 5, 300000]
    for n, size in enumerate(sizes):
        server.publish({**rows(10, n), "metadata": {"blob": "é" * size}})
    for n, size in enumerate(sizes):
        got = await a.recv()
        assert got["rows"][0]["id"] == n and got["metadata"]["blob"] == "é" * size
    await barrier(a)
