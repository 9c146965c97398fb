"""docs/protocol.md §3: the table, row and view page types, their groups and access checks."""
import pytest

from tornado_rt import PageType, Plugin

ROWS_10 = {"type": "rows_created", "table_id": 10, "rows": [{"id": 1}], "metadata": {}, "before_row_id": None}


def history(table_id, row_id):
    return {"type": "row_history_updated", "row_history_entry": {"id": 1}, "table_id": table_id, "row_id": row_id}


# --- table ---------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_table_page_for_workspace_members_only(server, connect, barrier):
    member = await connect(user_id=2)
    outsider = await connect(user_id=4)
    assert (await member.subscribe("table", table_id=10))["parameters"] == {"table_id": 10}
    await outsider.send({"page": "table", "table_id": 10})
    await barrier(member, outsider)
    assert (await outsider.subscribe("table", table_id=20))["parameters"] == {"table_id": 20}
    server.publish(ROWS_10)
    assert await member.recv() == ROWS_10
    await barrier(member, outsider)


@pytest.mark.gen_test
async def test_table_page_group_and_permission_group(server, connect):
    a = await connect(user_id=1)
    await a.subscribe("table", table_id="10")
    (conn,) = server.hub.groups["table-10"]
    assert conn.pages["table-10"].permission_group == "permissions-table-10"


@pytest.mark.gen_test
async def test_table_access_follows_the_directory(server, connect, barrier):
    a = await connect(user_id=5)  # in no workspace
    await a.send({"page": "table", "table_id": 10})
    await barrier(a)
    server.directory.add_member(1, 5)
    await a.subscribe("table", table_id=10)
    server.directory.remove_member(1, 5)
    await a.send({"page": "table", "table_id": 11})
    await barrier(a)


# --- row -----------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_row_page_for_whoever_may_view_the_table(server, connect, barrier):
    member = await connect(user_id=3)
    outsider = await connect(user_id=4)
    reply = await member.subscribe("row", table_id=10, row_id=7)
    assert reply == {"type": "page_add", "page": "row", "parameters": {"table_id": 10, "row_id": 7}}
    await outsider.send({"page": "row", "table_id": 10, "row_id": 7})
    await outsider.send({"page": "row", "table_id": 999, "row_id": 7})
    await barrier(member, outsider)
    (conn,) = server.hub.groups["table-10-row-7"]
    assert conn.pages["table-10-row-7"].permission_group == "permissions-table-10"


@pytest.mark.gen_test
async def test_row_pages_are_separate_from_each_other_and_from_the_table(server, connect, barrier):
    row7 = await connect(user_id=1)
    row8 = await connect(user_id=2)
    table = await connect(user_id=3)
    await row7.subscribe("row", table_id=10, row_id=7)
    await row8.subscribe("row", table_id=10, row_id=8)
    await table.subscribe("table", table_id=10)
    server.publish(history(10, 7))
    assert await row7.recv() == history(10, 7)
    server.publish(ROWS_10)
    assert await table.recv() == ROWS_10
    await barrier(row7, row8, table)


@pytest.mark.gen_test
async def test_row_access_check_is_the_policys_can_view_row(server, connect, barrier):
    original = type(server.policy).can_view_row
    server.policy.can_view_row = lambda principal, table_id, row_id: row_id != 13 and original(
        server.policy, principal, table_id, row_id)
    a = await connect(user_id=1)
    await a.send({"page": "row", "table_id": 10, "row_id": 13})
    await barrier(a)
    await a.subscribe("row", table_id=10, row_id=12)


# --- view ----------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_public_view_page(server, connect, barrier):
    anon = await connect(token="anonymous")
    user = await connect(user_id=4)  # not a member of the view's workspace: the view is public
    assert (await anon.subscribe("view", slug="pub"))["parameters"] == {"slug": "pub", "token": None}
    assert (await user.subscribe("view", slug="pub"))["parameters"] == {"slug": "pub", "token": None}
    await anon.send({"page": "view", "slug": "no-such-view"})
    await barrier(anon, user)
    msg = {"type": "force_view_rows_refresh", "view_id": 1}
    server.publish(msg, {"page": "view", "slug": "pub"})
    assert await anon.recv() == msg
    assert await user.recv() == msg
    await barrier(anon, user)


@pytest.mark.gen_test
async def test_password_protected_view_needs_its_token(server, connect, barrier):
    anon = await connect(token="anonymous")
    await anon.send({"page": "view", "slug": "secret-view"})
    await anon.send({"page": "view", "slug": "secret-view", "token": None})
    await anon.send({"page": "view", "slug": "secret-view", "token": "wrong"})
    await anon.send({"page": "view", "slug": "secret-view", "token": "s3cret-and-more"})
    await anon.send({"page": "view", "slug": "secret-view", "token": ""})
    await barrier(anon)
    reply = await anon.subscribe("view", slug="secret-view", token="s3cret")
    assert reply["parameters"] == {"slug": "secret-view", "token": "s3cret"}
    # the token is not part of the group: a publish to the slug reaches the subscriber
    assert list(server.hub.groups) == ["view-secret-view"]
    msg = {"type": "force_view_refresh", "view_id": 2}
    server.publish(msg, {"page": "view", "slug": "secret-view"})
    assert await anon.recv() == msg
    await barrier(anon)


@pytest.mark.gen_test
async def test_anonymous_may_only_subscribe_to_view(server, connect, barrier):
    anon = await connect(token="anonymous")
    await anon.send({"page": "table", "table_id": 10})
    await anon.send({"page": "row", "table_id": 10, "row_id": 1})
    await anon.send({"page": "dashboard", "dashboard_id": 1})
    await barrier(anon)
    assert server.hub.groups == {}
    await anon.subscribe("view", slug="pub")


OPEN = Plugin("open", page_types=[PageType("open_page", ("x",), "open-{x}", lambda principal, params, policy: True)])


@pytest.mark.rt_server(plugins=[OPEN])
@pytest.mark.gen_test
async def test_anonymous_denied_even_when_the_access_check_would_allow(server, connect, barrier):
    # a page type not marked anonymous is refused before its access check runs
    anon = await connect(token="anonymous")
    user = await connect(user_id=4)
    await anon.send({"page": "open_page", "x": 1})
    await barrier(anon, user)
    await user.subscribe("open_page", x=1)
