"""Directory changes as envelopes (issue 12.4): validated by the sender before anything is sent,
applied by the router in order with the events, and the Python API ``server.change_directory``.
The Redis side (every process, the snapshot) is in ``test_redis_directory.py``."""
import pytest

from tornado_rt.envelope import DIRECTORY, Envelope, PublishError, directory_envelope
from tornado_rt.hub import Hub
from tornado_rt.policy import Directory, DirectoryError
from tornado_rt.registry import Registry
from tornado_rt.router import Router


def test_a_change_is_validated_before_it_is_sent():
    with pytest.raises(DirectoryError) as refused:
        directory_envelope("add_member", [1, None])
    assert refused.value.field == "user_id"
    with pytest.raises(DirectoryError) as refused:
        directory_envelope("load", [{"workspaces": {"1": [1]}, "tablez": {}}])
    assert refused.value.field == "tablez"
    with pytest.raises(DirectoryError) as refused:
        directory_envelope("snapshot", [])  # a method, but not an operation
    assert refused.value.field == "operation"
    with pytest.raises(DirectoryError) as refused:
        directory_envelope("remove_table", [1, 2])
    assert refused.value.field == "operation"
    with pytest.raises(PublishError) as refused:  # valid for the directory, not as JSON
        directory_envelope("load", [{"public_views": {"v": {"table_id": 7, "note": float("nan")}}}])
    assert refused.value.field == "directory"
    # Sets and tuples travel as JSON lists.
    env = directory_envelope("set_workspace", [1, {3, 2}])
    assert (env.kind, env.type, env.data) == (DIRECTORY, "set_workspace", "[1,[2,3]]")


def test_the_router_applies_changes_in_order():
    directory = Directory()
    router = Router(Registry([]), directory, Hub(1 << 20))
    for operation, args in (("set_workspace", [1, [10]]), ("add_member", [1, 11]), ("set_table", [7, 1]),
                            ("remove_member", [1, 10])):
        router.dispatch(directory_envelope(operation, args))
    assert directory.snapshot() == {"workspaces": {"1": [11]}, "tables": {"7": 1}, "public_views": {}}
    # A change another process sent that this one refuses (they disagree) is logged, not raised.
    router.dispatch(Envelope(DIRECTORY, "add_member", "[1, null]"))
    router.dispatch(Envelope(DIRECTORY, "__init__", "[]"))
    assert directory.snapshot()["workspaces"] == {"1": [11]}


@pytest.mark.gen_test
async def test_change_directory_changes_what_subscriptions_are_answered_with(server, connect, barrier):
    client = await connect(user_id=9)
    await client.send({"page": "table", "table_id": 10})
    await barrier(client)  # refused: user 9 is no member of workspace 1
    await server.change_directory("add_member", 1, 9)
    await client.subscribe("table", table_id=10)
    with pytest.raises(DirectoryError) as refused:
        await server.change_directory("set_table", 10, "")
    assert refused.value.field == "workspace_id"
    await server.change_directory("remove_table", 10)
    await client.send({"page": "table", "table_id": 10})
    await barrier(client)
