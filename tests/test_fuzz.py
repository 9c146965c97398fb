"""Fuzzing a live server with hypothesis (issue 5): arbitrary JSON values (alone and as page
parameters), arbitrary bytes as text and binary frames, fragmented messages, deep nesting, huge
numbers and lone surrogates. Whatever arrives, the server never logs an unhandled exception and
a bystander connection keeps receiving, in order.

How hypothesis meets the live server: hypothesis drives its examples synchronously and cannot
run inside pytest-tornado's ``gen_test`` loop. So the server runs on a dedicated thread with its
own asyncio/Tornado loop (:class:`live_server.ServerThread`, one per module) and every example
talks to it over a real socket with the synchronous ``websockets.sync.client``. Each example
opens a fresh "fuzzer" connection, sends its frames, then a probe (``remove_page`` of a page
type that always answers ``page_discard``) and reads up to the probe's answer — or to the close,
when the input was one the server must close for (invalid UTF-8 in a text frame, a message over
``max_message_size``). Then the bystander must receive a freshly published message. Errors
logged by any thread are collected by a root-logger handler and checked after every example, so
hypothesis shrinks a failure to the smallest input that causes it.
"""
import contextlib
import json
import string

import pytest
import ujson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import SECRET, make_token, test_plugin
from live_server import ErrorLog, ServerThread
from tornado_rt import RealtimeServer, Settings

FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

PAGES = ["table", "row", "view", "dashboard", "", "Table", "page_add", "__class__"]
PARAMS = ["table_id", "row_id", "slug", "token", "dashboard_id", "page", "remove_page", "type"]


def make_server():
    server = RealtimeServer(Settings(jwt_secret=SECRET, ping_interval=0), plugins=[test_plugin],
                            load_entry_points=False)
    d = server.directory
    d.set_workspace(1, [1, 2, 3])
    d.set_table(10, 1)
    d.set_public_view("pub", 10)
    d.set_public_view("secret-view", 10, token="s3cret")
    return server


def strict_json(text):
    """Parse as RFC 8259 JSON: NaN and Infinity (which Python accepts, a browser does not) fail."""
    def refuse(constant):
        raise AssertionError(f"the server sent {constant}, which is not JSON: {text[:200]}")
    return json.loads(text, parse_constant=refuse)


class Live:
    def __init__(self):
        self.thread = ServerThread()
        self.server, port = self.thread.serve(make_server)
        self.url = f"ws://127.0.0.1:{port}/ws/core/"
        self.exits = contextlib.ExitStack()
        self.bystander = self.exits.enter_context(connect(f"{self.url}?jwt_token={make_token(2)}"))
        assert ujson.loads(self.bystander.recv(timeout=10))["success"] is True
        self.bystander.send(ujson.dumps({"page": "table", "table_id": 10}))
        assert ujson.loads(self.bystander.recv(timeout=10))["type"] == "page_add"
        self.published = 0
        self.probes = 0

    def bystander_still_served(self):
        self.published += 1
        msg = {"type": "rows_created", "table_id": 10, "rows": [{"id": self.published}],
                "metadata": {}, "before_row_id": None}
        self.server.publish(msg)
        assert ujson.loads(self.bystander.recv(timeout=10)) == msg

    def fuzz(self, *frames):
        """Send ``frames`` (str: text, bytes: binary, ("text", bytes): raw text frame, list:
        fragments) on a fresh connection, then the probe; read to the probe's answer or to the
        close. Returns the messages received before the probe."""
        with connect(f"{self.url}?jwt_token={make_token(1)}", max_size=None) as user:
            return self._fuzz(user, frames)

    def _fuzz(self, user, frames):
        try:
            assert ujson.loads(user.recv(timeout=10))["success"] is True
            for frame in frames:
                if isinstance(frame, tuple):
                    user.send(frame[1], text=True)
                else:
                    user.send(frame)
            self.probes += 1
            probe = f"probe-{self.probes}"
            user.send(ujson.dumps({"remove_page": "dashboard", "dashboard_id": probe}))
            received = []
            while True:
                text = user.recv(timeout=10)
                msg = strict_json(text)  # what the server sends is always valid JSON
                if msg == {"type": "page_discard", "page": "dashboard", "parameters": {"dashboard_id": probe}}:
                    return received
                received.append(msg)
        except ConnectionClosed:
            return None


@pytest.fixture(scope="module")
def live():
    with ErrorLog() as errors:
        live = Live()
        live.errors = errors
        yield live
        live.exits.close()
        live.thread.stop(live.server)
        live.thread.close()
    assert not errors.errors()


def check(live):
    assert not live.errors.errors(), live.errors.errors()[0].getMessage()
    live.bystander_still_served()


# --- strategies -------------------------------------------------------------------------------------

# text with lone surrogates (category Cs) and control characters; JSON-escaped when sent
any_text = st.text(st.characters(codec=None, categories=None), max_size=40)
numbers = st.one_of(
    st.integers(min_value=-(10 ** 400), max_value=10 ** 400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1e999999", "-1e999999", "1" * 5000, "-0", "0.0000000000000000000001e-400"]),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                         st.floats(allow_nan=False, allow_infinity=False), any_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(any_text, inner, max_size=5)), max_leaves=25)


def as_json(value) -> str:
    """JSON text of ``value``; lone surrogates become \\udXXX escapes (ensure_ascii)."""
    return json.dumps(value)


@st.composite
def page_messages(draw):
    """A page/remove_page message whose parameters hold arbitrary JSON values."""
    obj = {}
    for key in draw(st.lists(st.sampled_from(["page", "remove_page"]), min_size=1, max_size=2, unique=True)):
        obj[key] = draw(st.one_of(st.sampled_from(PAGES), json_values))
    for param in draw(st.lists(st.sampled_from(PARAMS), max_size=4, unique=True)):
        obj[param] = draw(st.one_of(json_values, st.sampled_from([10, "10", 11, "pub", "s3cret", 1, 2])))
    return as_json(obj)


@st.composite
def huge_number_messages(draw):
    number = draw(numbers)
    text = number if isinstance(number, str) else as_json(number)
    page = draw(st.sampled_from(["table", "row", "dashboard", "view"]))
    key = draw(st.sampled_from(["page", "remove_page"]))
    param = draw(st.sampled_from(["table_id", "row_id", "dashboard_id", "slug", "token"]))
    return draw(st.sampled_from([text, f'{{"{key}":"{page}","{param}":{text},"table_id":10}}']))


# --- tests ------------------------------------------------------------------------------------------

@FUZZ
@given(value=json_values)
def test_arbitrary_json_values(live, value):
    live.fuzz(as_json(value))
    check(live)


@FUZZ
@given(messages=st.lists(page_messages(), min_size=1, max_size=4))
def test_page_messages_with_arbitrary_parameters(live, messages):
    received = live.fuzz(*messages)
    assert received is not None  # valid JSON never closes the connection
    for msg in received:
        assert msg["type"] in ("page_add", "page_discard")
    check(live)


@FUZZ
@given(data=st.binary(max_size=3000), as_text=st.booleans())
def test_arbitrary_bytes_as_text_and_binary_frames(live, data, as_text):
    received = live.fuzz(("text", data) if as_text else data)
    if not as_text:
        assert received == []  # binary frames are ignored, the connection stays usable
    check(live)


@FUZZ
@given(fragments=st.lists(st.one_of(st.binary(max_size=200), any_text), min_size=1, max_size=5))
def test_fragmented_messages(live, fragments):
    kind = type(fragments[0])
    fragments = [f for f in fragments if isinstance(f, kind)]
    try:
        live.fuzz(fragments)
    except UnicodeEncodeError:
        pass  # websockets cannot encode a str fragment holding a lone surrogate: nothing was sent
    check(live)


@FUZZ
@given(depth=st.integers(min_value=1, max_value=30000), kind=st.sampled_from("[{x"),
       wrap=st.booleans())
def test_deep_nesting(live, depth, kind, wrap):
    if kind == "[":
        text = "[" * depth + "]" * depth
    elif kind == "{":
        text = '{"a":' * depth + "1" + "}" * depth
    else:  # unbalanced
        text = "[" * depth
    if wrap:
        text = f'{{"remove_page":"dashboard","dashboard_id":{text}}}'
    received = live.fuzz(text)
    if len(text.encode()) <= live.server.settings.max_message_size:
        assert received is not None
    check(live)


@FUZZ
@given(message=huge_number_messages())
def test_huge_numbers(live, message):
    live.fuzz(message)
    check(live)


lone_surrogate_text = st.tuples(any_text, st.integers(0xD800, 0xDFFF).map(chr), any_text).map("".join)


@FUZZ
@given(value=lone_surrogate_text,
       where=st.sampled_from(["page", "slug", "token", "dashboard_id", "key", "remove"]))
def test_lone_surrogates(live, value, where):
    """A lone surrogate is valid as a JSON escape but not encodable as UTF-8; a parameter holding
    one is echoed back as the client sent it (escaped), never crashing the reply."""
    expected = []
    if where == "page":
        obj = {"page": value}
    elif where == "slug":
        obj = {"page": "view", "slug": value}
    elif where == "token":
        obj = {"page": "view", "slug": "pub", "token": value}
        expected = [{"type": "page_add", "page": "view", "parameters": {"slug": "pub", "token": value}}]
    elif where == "dashboard_id":
        obj = {"page": "dashboard", "dashboard_id": value}
        expected = [{"type": "page_add", "page": "dashboard", "parameters": {"dashboard_id": value}}]
    elif where == "key":
        obj = {"page": "dashboard", "dashboard_id": 1, value: value}
        expected = [{"type": "page_add", "page": "dashboard", "parameters": {"dashboard_id": 1}}]
    else:
        obj = {"remove_page": "dashboard", "dashboard_id": value}
        expected = [{"type": "page_discard", "page": "dashboard", "parameters": {"dashboard_id": value}}]
    assert live.fuzz(as_json(obj)) == expected
    check(live)


def test_control_characters_and_keys_in_page_names(live):
    """Deterministic odds and ends: every printable and control character as a page name."""
    for ch in string.printable + "\x00\x7f\u2028\ufeff":
        assert live.fuzz(as_json({"page": ch}), as_json({"remove_page": ch})) == []
    check(live)
