"""One error base for every refusal that names a value, and one id check (pure logic)."""
import pytest
from tornado.web import HTTPError

from tornado_rt import Directory, FieldError, PublishError
from tornado_rt.cli import ConfigError
from tornado_rt.errors import require_id, require_ids
from tornado_rt.httpapi import ApiError
from tornado_rt.policy import DirectoryError
from tornado_rt.settings import SettingError


def test_every_field_error_keeps_its_old_base_and_names_the_field():
    errors = [PublishError("bad", "message.type", "rows_created"), DirectoryError("bad", "workspaces.1"),
              SettingError("bad", "max_message_size"), ConfigError("--port: bad", "--port"),
              ApiError(400, "bad", "user_ids")]
    for error in errors:
        assert isinstance(error, FieldError), error
        assert error.message == ("--port: bad" if isinstance(error, ConfigError) else "bad")
        assert error.field is not None
    assert all(isinstance(e, ValueError) for e in errors[:3])
    assert isinstance(errors[4], HTTPError) and errors[4].status_code == 400
    assert str(errors[0]) == "bad" and errors[0].message_type == "rows_created"


def test_require_id_and_ids():
    assert require_id("7", "table_id") == 7 and require_id("ab-1", "user_id") == "ab-1"
    assert require_ids([1, "2", "x"], "user_ids") == [1, 2, "x"]
    with pytest.raises(FieldError) as whole:
        require_ids("1,2", "user_ids")
    assert whole.value.field == "user_ids" and "list of ids" in whole.value.message
    with pytest.raises(PublishError) as item:
        require_ids([1, True], "to.user_ids", PublishError, message_type="rows_created")
    assert item.value.field == "to.user_ids[1]" and item.value.message_type == "rows_created"
    with pytest.raises(FieldError) as one:
        require_id(1.5, "workspace_id", text="workspace_id must be an id")
    assert one.value.field == "workspace_id" and one.value.message == "workspace_id must be an id"


def test_directory_refusals_name_the_field_and_change_nothing():
    directory = Directory({"workspaces": {"1": [10]}, "tables": {"7": 1},
                           "public_views": {"pub": {"table_id": 7, "token": None}}})
    before = directory.snapshot()
    for snapshot, field in [
        ({"workspaces": {"1": [10, None]}}, "workspaces.1[1]"),
        ({"workspaces": {"x y": "10"}}, "workspaces.x y"),
        ({"tables": {"7": [1]}}, "tables.7"),
        # a table id that is not an id used to be stored as None (a view of no table): refused now
        ({"public_views": {"pub": {"table_id": [7]}}}, "public_views.pub.table_id"),
    ]:
        with pytest.raises(DirectoryError) as refused:
            directory.load(snapshot)
        assert refused.value.field == field, (snapshot, refused.value.field)
        assert directory.snapshot() == before
    with pytest.raises(DirectoryError) as refused:
        directory.set_public_view("pub", {"id": 7})
    assert refused.value.field == "table_id" and directory.snapshot() == before
    with pytest.raises(DirectoryError) as refused:
        directory.add_member(None, 10)
    assert refused.value.field == "workspace_id"
