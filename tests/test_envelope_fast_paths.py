"""The publish hot path's shortcuts in tornado_rt.envelope give the same results as the general
path (pure logic, no sockets): the serialized text, the refusals, the audience."""
from __future__ import annotations

from collections import UserDict

import pytest
import ujson

from tornado_rt.envelope import PublishError, default_audience, dumps, message_envelope, message_type_of
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


# --- issue 16: the serializer called with positional options, the one-key page audience ----------

@pytest.mark.parametrize("message", [
    {"type": "rows_updated", "table_id": 3, "url": "https://x/y", "html": "<a href='x'>&</a>",
     "lines": "\u2028\u2029 tab\t nl\n quote\" back\\", "big": 2 ** 63 - 1, "neg": -2 ** 63,
     "float": 0.1, "exp": 1e300, "tiny": 5e-324, "flags": [True, False, None], "nested": {"a": [{}, []]}},
    {"type": "rows_updated", "table_id": 3, "rows": [{"name": "Zoë, 東京, emoji \U0001F600"}]},
])
def test_the_serializer_in_use_writes_exactly_the_keyword_calls_text(message: dict) -> None:
    """Whichever call envelope.dumps picked for this ujson, the text is byte for byte that of
    ujson.dumps with the keyword options (what clients have always received)."""
    from tornado_rt import envelope
    assert envelope._serialize(message) == ujson.dumps(message, ensure_ascii=False, reject_bytes=True,
                                                      allow_nan=False)
    assert dumps(message) == envelope._keyword_dumps(message)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), b"bytes", object()])
def test_values_json_cannot_hold_are_refused_naming_the_field(bad) -> None:
    with pytest.raises(PublishError) as info:
        dumps({"type": "rows_updated", "value": [bad]}, "[1].message", "rows_updated")
    assert info.value.field == "[1].message" and info.value.message_type == "rows_updated"
    assert "cannot be serialized" in str(info.value)


def _general_audience(registry: Registry, message: dict) -> list:
    """The audience through the general path (a Mapping that is not a dict skips the shortcut)."""
    return default_audience(registry, registry.message_type(message["type"]), UserDict(message),
                            message["type"])


@pytest.mark.parametrize("table_id", [3, "3", "abc", 0, -1, 2.5, 10 ** 30])
def test_one_key_page_audience_is_the_general_paths(table_id) -> None:
    registry = _registry()
    message = {"type": "rows_updated", "table_id": table_id}
    assert message_envelope(registry, message).audience == _general_audience(registry, message)


@pytest.mark.parametrize("message", [
    {"type": "rows_updated"},
    {"type": "rows_updated", "table_id": None},
    {"type": "rows_updated", "table_id": {"id": 3}},
    {"type": "rows_updated", "table_id": [3]},
    {"type": "rows_updated", "table_id": True},
    {"type": "rows_updated", "table_id": False},
])
def test_one_key_page_audience_refuses_as_the_general_path(message: dict) -> None:
    registry = _registry()
    with pytest.raises(PublishError) as fast:
        message_envelope(registry, message)
    with pytest.raises(PublishError) as general:
        _general_audience(registry, message)
    assert (str(fast.value), fast.value.field, fast.value.message_type) == \
        (str(general.value), general.value.field, general.value.message_type)
    assert fast.value.field == "message.table_id"


def test_one_key_page_audience_with_an_optional_parameter_accepts_what_the_general_path_does() -> None:
    """A page whose one parameter is not required takes a bool or a list as the general path
    does (the shortcut only answers for values the general path accepts too)."""
    page = PageType("flag", ("on",), "flag-{on}", lambda *a: True, required=())
    registry = Registry([Plugin("f", page_types=[page], message_types=[
        MessageType("flagged", "page", page="flag", keys={"on": "on"})])])
    for value in (True, [1], 7):
        message = {"type": "flagged", "on": value}
        assert message_envelope(registry, message).audience == _general_audience(registry, message)
