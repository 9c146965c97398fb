"""docs/protocol.md §6: default audiences of the built-in message types, every explicit audience kind,
and the message types with side effects on the directory."""
import pytest

# Directory of the `server` fixture: workspace 1 = users 1, 2, 3 (tables 10, 11);
# workspace 2 = user 4 (table 20); user 5 is in no workspace.


async def clients_by_user(connect, *user_ids):
    return {u: await connect(user_id=u) for u in user_ids}


async def expect(msg, receivers, everyone, barrier):
    """Each of ``receivers`` gets ``msg`` next, and nobody in ``everyone`` gets anything else."""
    for client in receivers:
        assert await client.recv() == msg
    await barrier(*everyone)


# --- core plugin defaults ------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_core_group_updated_goes_to_the_workspace(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2, 3, 4, 5)
    msg = {"type": "group_updated", "workspace_id": 1, "workspace": {"id": 1, "name": "W"}}
    server.publish(msg)
    await expect(msg, [c[1], c[2], c[3]], c.values(), barrier)


@pytest.mark.gen_test
async def test_core_user_updated_goes_to_every_workspace_of_the_user(server, connect, barrier):
    server.directory.add_member(2, 3)  # user 3 is in workspaces 1 and 2
    c = await clients_by_user(connect, 1, 2, 3, 4, 5)
    msg = {"type": "user_updated", "user": {"id": 3, "username": "c@x", "first_name": "C"}}
    server.publish(msg)
    await expect(msg, [c[1], c[2], c[3], c[4]], c.values(), barrier)
    msg = {"type": "user_deleted", "user": {"id": 4, "username": "d@x", "first_name": "D"}}
    server.publish(msg)
    await expect(msg, [c[3], c[4]], c.values(), barrier)
    msg = {"type": "user_restored", "user": {"id": 5, "username": "e@x", "first_name": "E"}}
    server.publish(msg)  # in no workspace: nobody
    await barrier(*c.values())


@pytest.mark.gen_test
async def test_core_application_created_goes_to_the_applications_workspace(server, connect, barrier):
    c = await clients_by_user(connect, 1, 4)
    msg = {"type": "application_created", "application": {"id": 3, "workspace": {"id": 2}}}
    server.publish(msg)
    await expect(msg, [c[4]], c.values(), barrier)
    msg = {"type": "application_updated", "application_id": 3, "application": {"id": 3, "workspace": {"id": 1}}}
    server.publish(msg)
    await expect(msg, [c[1]], c.values(), barrier)


@pytest.mark.gen_test
async def test_core_application_created_as_individual_payloads(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2, 4)
    m1 = {"type": "application_created", "application": {"id": 3, "workspace": {"id": 1}, "for": 1}}
    m2 = {"type": "application_created", "application": {"id": 3, "workspace": {"id": 1}, "for": 2}}
    server.publish_individual({1: m1, 2: m2})
    assert await c[1].recv() == m1
    assert await c[2].recv() == m2
    await barrier(*c.values())


# --- database plugin defaults --------------------------------------------------------------------

@pytest.mark.gen_test
async def test_database_rows_created_goes_to_the_table_page(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2)
    await c[1].subscribe("table", table_id=10)
    await c[2].subscribe("table", table_id=11)
    msg = {"type": "rows_created", "table_id": 10, "rows": [{"id": 1}], "metadata": {}, "before_row_id": None}
    server.publish(msg)
    await expect(msg, [c[1]], c.values(), barrier)


@pytest.mark.gen_test
async def test_database_field_updated_routes_by_field_table_id(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2)
    await c[1].subscribe("table", table_id=10)
    await c[2].subscribe("table", table_id=11)
    msg = {"type": "field_updated", "field_id": 5, "field": {"id": 5, "table_id": 11}, "related_fields": []}
    server.publish(msg)
    await expect(msg, [c[2]], c.values(), barrier)


@pytest.mark.gen_test
async def test_database_row_history_updated_goes_to_the_row_page(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2, 3)
    await c[1].subscribe("row", table_id=10, row_id=4)
    await c[2].subscribe("row", table_id=10, row_id=5)
    await c[3].subscribe("table", table_id=10)
    msg = {"type": "row_history_updated", "row_history_entry": {"id": 9}, "table_id": 10, "row_id": 4}
    server.publish(msg)
    await expect(msg, [c[1]], c.values(), barrier)


@pytest.mark.gen_test
async def test_database_table_updated_goes_to_the_tables_workspace(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2, 4)
    msg = {"type": "table_updated", "table_id": 20, "table": {"id": 20}, "force_table_refresh": False}
    server.publish(msg)
    await expect(msg, [c[4]], c.values(), barrier)
    msg = {**msg, "table_id": 10, "table": {"id": 10}}
    server.publish(msg)
    await expect(msg, [c[1], c[2]], c.values(), barrier)
    server.publish({**msg, "table_id": 999})  # unknown table: no workspace, nobody
    await barrier(*c.values())


@pytest.mark.gen_test
async def test_database_table_created_goes_to_the_tables_workspace(server, connect, barrier):
    c = await clients_by_user(connect, 1, 4)
    server.directory.set_table(30, 2)
    msg = {"type": "table_created", "table": {"id": 30, "name": "new"}}
    server.publish(msg)
    await expect(msg, [c[4]], c.values(), barrier)
    server.publish(msg, {"workspace_id": 1})  # explicit
    await expect(msg, [c[1]], c.values(), barrier)


@pytest.mark.gen_test
async def test_database_tables_reordered_alias_is_accepted(server, connect, barrier):
    c = await clients_by_user(connect, 1, 4)
    for name in ("tables_reordered", "tables_re_ordered"):
        msg = {"type": name, "database_id": 1, "order": [11, 10]}
        server.publish(msg, {"workspace_id": 1})
        await expect(msg, [c[1]], c.values(), barrier)


# --- premium plugin defaults ---------------------------------------------------------------------

@pytest.mark.gen_test
async def test_premium_row_comment_created_goes_to_the_table_page(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2)
    await c[1].subscribe("table", table_id=10)
    await c[2].subscribe("row", table_id=10, row_id=1)  # the row page does not get it
    msg = {"type": "row_comment_created", "row_comment": {"id": 1, "table_id": 10, "row_id": 1}}
    server.publish(msg)
    await expect(msg, [c[1]], c.values(), barrier)


# --- every explicit audience kind ----------------------------------------------------------------

MSG = {"type": "user_data_updated", "data": {"x": 1}}


@pytest.mark.gen_test
async def test_explicit_page_audience(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2)
    await c[1].subscribe("row", table_id=10, row_id=2)
    await c[2].subscribe("table", table_id=10)
    server.publish(MSG, {"page": "row", "table_id": 10, "row_id": 2})
    await expect(MSG, [c[1]], c.values(), barrier)
    server.publish(MSG, {"page": "table", "table_id": "10"})
    await expect(MSG, [c[2]], c.values(), barrier)


@pytest.mark.gen_test
async def test_explicit_page_audience_overrides_the_default(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2)
    await c[1].subscribe("table", table_id=10)
    await c[2].subscribe("table", table_id=11)
    msg = {"type": "rows_created", "table_id": 10, "rows": [], "metadata": {}, "before_row_id": None}
    server.publish(msg, {"page": "table", "table_id": 11})
    await expect(msg, [c[2]], c.values(), barrier)


@pytest.mark.gen_test
async def test_explicit_workspace_audience(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2, 3, 4)
    server.publish(MSG, {"workspace_id": 2})
    await expect(MSG, [c[4]], c.values(), barrier)


@pytest.mark.gen_test
async def test_explicit_workspaces_audience(server, connect, barrier):
    c = await clients_by_user(connect, 1, 4, 5)
    server.publish(MSG, {"workspace_ids": [1, 2]})
    await expect(MSG, [c[1], c[4]], c.values(), barrier)


@pytest.mark.gen_test
async def test_explicit_users_audience(server, connect, barrier):
    c = await clients_by_user(connect, 1, 4, 5)
    server.publish(MSG, {"user_ids": [5, 4]})
    await expect(MSG, [c[4], c[5]], c.values(), barrier)


@pytest.mark.gen_test
async def test_all_users_audience_includes_anonymous(server, connect, barrier):
    c = await clients_by_user(connect, 1, 4, 5)
    anon = await connect(token="anonymous")
    server.publish(MSG, {"all_users": True})
    await expect(MSG, [*c.values(), anon], [*c.values(), anon], barrier)


@pytest.mark.gen_test
async def test_individual_audience(server, connect, barrier):
    c = await clients_by_user(connect, 1, 4, 5)
    anon = await connect(token="anonymous")
    payloads = {1: {"type": "notifications_created", "n": 1}, "4": {"type": "job_started", "n": 4}}
    server.publish_individual(payloads)
    assert await c[1].recv() == payloads[1]
    assert await c[4].recv() == payloads["4"]
    await barrier(*c.values(), anon)


# --- side effects on the directory ---------------------------------------------------------------

@pytest.mark.gen_test
async def test_group_user_added_reaches_the_new_member_and_updates_the_directory(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2, 3, 4, 5)
    msg = {"type": "group_user_added", "id": 50, "workspace_id": 1,
           "workspace_user": {"id": 50, "user_id": 5, "permissions": "MEMBER"}}
    server.publish(msg)
    await expect(msg, [c[1], c[2], c[3], c[5]], c.values(), barrier)
    assert 5 in server.directory.workspace_members(1)
    await c[5].subscribe("table", table_id=10)
    later = {"type": "group_updated", "workspace_id": 1, "workspace": {"id": 1}}
    server.publish(later)
    await expect(later, [c[1], c[2], c[3], c[5]], c.values(), barrier)


@pytest.mark.gen_test
async def test_group_deleted_reaches_members_as_before_deletion(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2, 3, 4)
    msg = {"type": "group_deleted", "workspace_id": 1}
    server.publish(msg)
    await expect(msg, [c[1], c[2], c[3]], c.values(), barrier)
    assert server.directory.workspace_members(1) == set()
    assert server.directory.table_workspace(10) is None
    # the workspace is gone: its messages reach nobody and its tables cannot be subscribed to
    server.publish({"type": "group_updated", "workspace_id": 1, "workspace": {"id": 1}})
    await c[1].send({"page": "table", "table_id": 10})
    await barrier(*c.values())


@pytest.mark.gen_test
async def test_before_group_deleted_goes_to_the_workspace(server, connect, barrier):
    c = await clients_by_user(connect, 1, 4)
    msg = {"type": "before_group_deleted", "workspace_id": 1}
    server.publish(msg)
    await expect(msg, [c[1]], c.values(), barrier)
    assert 1 in server.directory.workspace_members(1)  # no side effect


@pytest.mark.gen_test
async def test_user_permanently_deleted(server, connect, barrier):
    server.directory.add_member(2, 2)  # user 2 is in workspaces 1 and 2
    c = await clients_by_user(connect, 1, 2, 4, 5)
    msg = {"type": "user_permanently_deleted", "user_id": 2}
    server.publish(msg)
    await expect(msg, [c[1], c[2], c[4]], c.values(), barrier)
    assert server.directory.user_workspaces(2) == set()
    for ws in (1, 2):
        assert 2 not in server.directory.workspace_members(ws)
    server.publish({"type": "group_updated", "workspace_id": 2, "workspace": {"id": 2}})
    assert (await c[4].recv())["type"] == "group_updated"
    await c[2].send({"page": "table", "table_id": 10})
    await barrier(*c.values())


@pytest.mark.gen_test
async def test_group_user_deleted_reaches_the_removed_member(server, connect, barrier):
    c = await clients_by_user(connect, 1, 2, 4)
    msg = {"type": "group_user_deleted", "id": 1, "workspace_id": 1, "workspace_user": {"id": 1, "user_id": 2}}
    server.publish(msg)
    await expect(msg, [c[1], c[2]], c.values(), barrier)
    assert server.directory.workspace_members(1) == {1, 3}
