"""The hub's permission index (issue 10, item 6): revocations and deletions find the affected
subscriptions through ``hub.permissions`` instead of walking every connection. These tests prove
that they still drop exactly the right pages, that the index follows every subscribe, resubscribe,
unsubscribe, revocation and close, and that it is empty once the connections are gone (no leak)."""
import pytest
import ujson

from tornado_rt import PageType, Plugin

from conftest import wait_until


def discard(page, **params):
    return {"type": "page_discard", "page": page, "parameters": params}


def rows(table_id):
    return {"type": "rows_created", "table_id": table_id, "rows": [], "metadata": {}, "before_row_id": None}


def key(msg):
    return ujson.dumps(msg, sort_keys=True)


async def recv_set(client, n):
    return sorted([key(await client.recv()) for _ in range(n)])


def as_set(*msgs):
    return sorted(key(m) for m in msgs)


# A page type whose page group does not determine its permission group: connections on the same
# page can be under different permission groups, and the index must tell them apart.
shared_plugin = Plugin("shared-pages", page_types=[
    PageType("shared", ("topic", "owner"), "shared-{topic}", lambda principal, params, policy: True,
             permission_group="perm-{owner}"),
])


@pytest.mark.gen_test
async def test_group_deleted_drops_every_table_page_of_that_workspace_only(server, connect, barrier):
    a = await connect(user_id=1)
    b = await connect(user_id=2)
    other = await connect(user_id=4)  # workspace 2 (table 20)
    await a.subscribe("table", table_id=10)
    await a.subscribe("row", table_id=10, row_id=1)
    await a.subscribe("table", table_id=11)
    await a.subscribe("dashboard", dashboard_id=7)
    await b.subscribe("table", table_id=11)
    await other.subscribe("table", table_id=20)
    assert set(server.hub.permissions) == {"permissions-table-10", "permissions-table-11", "permissions-table-20"}

    deleted = {"type": "group_deleted", "workspace_id": 1}
    server.publish(deleted)
    assert await recv_set(a, 4) == as_set(deleted, discard("table", table_id=10),
                                          discard("row", table_id=10, row_id=1), discard("table", table_id=11))
    assert await recv_set(b, 2) == as_set(deleted, discard("table", table_id=11))
    await barrier(a, b, other)
    assert server.hub.permissions == {"permissions-table-20": {"table-20": 1}}

    server.publish(rows(20))  # the other workspace's page is kept
    assert await other.recv() == rows(20)
    server.publish({"type": "dashboard_updated", "dashboard_id": 7})  # a page without permission group too
    assert await a.recv() == {"type": "dashboard_updated", "dashboard_id": 7}
    await barrier(a, b, other)


@pytest.mark.gen_test
async def test_deleting_a_workspace_nobody_has_open_sends_nothing(server, connect, barrier):
    server.directory.set_workspace(9, [])
    for table in range(100, 600):
        server.directory.set_table(table, 9)
    a = await connect(user_id=1)
    await a.subscribe("table", table_id=10)
    server.publish({"type": "group_deleted", "workspace_id": 9})
    await barrier(a)
    assert server.directory.workspace_tables(9) == set()
    assert server.hub.permissions == {"permissions-table-10": {"table-10": 1}}
    server.publish(rows(10))
    assert await a.recv() == rows(10)


@pytest.mark.gen_test
async def test_index_follows_subscribe_unsubscribe_revoke_and_close(server, connect, barrier):
    hub = server.hub
    a = await connect(user_id=1)
    a2 = await connect(user_id=1)
    b = await connect(user_id=2)
    for c in (a, a2, b):
        await c.subscribe("table", table_id=10)
    await a.subscribe("row", table_id=10, row_id=3)
    await a.subscribe("table", table_id=10)  # subscribing again counts once
    assert hub.permissions == {"permissions-table-10": {"table-10": 3, "table-10-row-3": 1}}

    await a.send({"remove_page": "row", "table_id": 10, "row_id": 3})
    assert await a.recv() == discard("row", table_id=10, row_id=3)
    assert hub.permissions == {"permissions-table-10": {"table-10": 3}}

    assert server.revoke([1], "permissions-table-10") == 2  # both of user 1's connections
    assert await a.recv() == discard("table", table_id=10)
    assert await a2.recv() == discard("table", table_id=10)
    await barrier(a, a2, b)
    assert hub.permissions == {"permissions-table-10": {"table-10": 1}}

    b.close()
    await wait_until(lambda: not hub.permissions)
    assert hub.groups == {}
    assert server.revoke([2], "permissions-table-10") == 0  # nothing left under it
    await barrier(a, a2)


@pytest.mark.gen_test
@pytest.mark.rt_server(plugins=[shared_plugin])
async def test_connections_on_one_page_under_different_permission_groups(server, connect, barrier):
    x = await connect(user_id=1)
    y = await connect(user_id=2)
    await x.subscribe("shared", topic="t", owner=1)
    await y.subscribe("shared", topic="t", owner=2)
    assert server.hub.permissions == {"perm-1": {"shared-t": 1}, "perm-2": {"shared-t": 1}}

    assert server.revoke([1, 2], "perm-1") == 1  # y is on the same page, under perm-2: kept
    assert await x.recv() == discard("shared", topic="t", owner=1)
    await barrier(x, y)
    assert server.hub.permissions == {"perm-2": {"shared-t": 1}}

    # resubscribing the same page with other parameters moves it to the other permission group
    await y.subscribe("shared", topic="t", owner=3)
    assert server.hub.permissions == {"perm-3": {"shared-t": 1}}
    assert server.revoke([2], "perm-2") == 0
    await barrier(x, y)
    assert server.router.drop_permission_group("perm-3") == 1
    assert await y.recv() == discard("shared", topic="t", owner=3)
    await barrier(x, y)
    assert server.hub.permissions == {} and server.hub.groups == {}


def test_directory_finds_a_tables_public_views_without_scanning_every_view():
    """Pure logic: the directory's table -> public views index (deleting a table, or a workspace
    of many, no longer scans every view per table) follows every change and a reload."""
    from tornado_rt import Directory
    d = Directory()
    d.set_table(1, 1)
    d.set_table(2, 1)
    d.set_public_view("a", 1)
    d.set_public_view("b", 1, token="t")
    d.set_public_view("c", 2)
    d.set_public_view("free")  # a view of no table
    assert d.public_views_of_table(1) == ["a", "b"] and d.public_views_of_table("2") == ["c"]
    d.set_public_view("a", 2)  # moved to another table
    assert d.public_views_of_table(1) == ["b"] and d.public_views_of_table(2) == ["c", "a"]
    d.remove_public_view("c")
    assert d.public_views_of_table(2) == ["a"]
    assert Directory(d.snapshot()).public_views_of_table(2) == ["a"]
    d.remove_table(2)
    assert d.public_views_of_table(2) == [] and not d.can_view_public_view("a", None)
    d.remove_workspace(1)
    assert d.snapshot()["public_views"] == {"free": {"table_id": None, "token": None}}
    assert d.public_views_of_table(1) == [] and d._table_views == {}
