"""The publish hot path's shortcuts in tornado_rt.envelope give the same results as the general
path (pure logic, no sockets): the serialized text, the refusals, the audience."""
from __future__ import annotations

from collections import UserDict

import pytest
import ujson

from tornado_rt.envelope import PublishError, dumps, message_envelope, message_type_of
from tornado_rt.registry import MessageType, PageType, Plugin, Registry


def _registry() -> Registry:
    page = PageType("table", ("table_id",), "table-{table_id}", lambda *a: True)
    two = PageType("row", ("table_id", "row_id"), "table-{table_id}-row-{row_id}", lambda *a: True)
    return Registry([Plugin("t", page_types=[page, two], message_types=[
        MessageType("rows_updated", "page", page="table", keys={"table_id": "table_id"}),
        MessageType("row_changed", "page", page="row", keys={"row_id": "row.id", "table_id": "table_id"}),
        # keys beyond the page's parameters: still each must be present
        MessageType("moved", "page", page="table", keys={"table_id": "table_id", "row_id": "row_id"}),
    ])])


@pytest.mark.parametrize("message", [
    {"type": "rows_updated", "table_id": 3, "rows": [{"id": 1, "name": "plain ascii / slash"}]},
    {"type": "rows_updated", "table_id": 3, "rows": [{"name": "Zoë, 東京, emoji \U0001F600"}]},
])
def test_serialized_text_is_ujson_compact_text(message: dict) -> None:
    env = message_envelope(_registry(), message)
    assert env.data == ujson.dumps(message, ensure_ascii=False, reject_bytes=True, allow_nan=False)
    assert env.audience == ["page", "table-3"]


def test_lone_surrogate_is_refused_naming_the_field() -> None:
    with pytest.raises(PublishError) as info:
        dumps({"type": "rows_updated", "name": "bad \ud800 text"}, "[2].message", "rows_updated")
    assert info.value.field == "[2].message"
    assert "cannot be serialized" in str(info.value)


def test_a_mapping_that_is_not_a_dict_is_still_a_message() -> None:
    registry = _registry()
    assert message_type_of(registry, UserDict({"type": "rows_updated", "table_id": 5})) is \
        registry.message_type("rows_updated")
    with pytest.raises(PublishError, match="must be a JSON object"):
        message_envelope(_registry(), ["rows_updated"])


def test_audience_with_two_keys_in_another_order_than_the_page_parameters() -> None:
    env = message_envelope(_registry(), {"type": "row_changed", "table_id": 4, "row": {"id": 9}})
    assert env.audience == ["page", "table-4-row-9"]
    with pytest.raises(PublishError) as info:
        message_envelope(_registry(), {"type": "row_changed", "table_id": 4, "row": {}})
    assert info.value.field == "message.row.id"


def test_keys_beyond_the_page_parameters_are_still_required() -> None:
    assert message_envelope(_registry(), {"type": "moved", "table_id": 4, "row_id": 1}).audience == \
        ["page", "table-4"]
    with pytest.raises(PublishError) as info:
        message_envelope(_registry(), {"type": "moved", "table_id": 4})
    assert info.value.field == "message.row_id"
