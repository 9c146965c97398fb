"""The session without sockets (issue 9 §2), in the style of the ``websockets`` library's protocol
tests: feed it a token and client frames, assert the frames it queues, its state, and what it
asks of its transport. The hub, hooks, registry and directory are the real ones; only the
transport (I/O, not under test here) is a recorder."""
import asyncio
import sys

import pytest
import ujson

from conftest import SECRET, make_token, test_plugin
from tornado_rt import JWTAuthenticator, PageType, Plugin, Settings, closecodes
from tornado_rt.hooks import Hooks
from tornado_rt.hub import Hub
from tornado_rt.policy import Directory
from tornado_rt.registry import Registry
from tornado_rt.server import builtin_plugins
from tornado_rt.session import BINARY, PING, PING_FRAME, PONG, TEXT, Session, SessionContext, State


class Wire:
    """What the session asks of its transport, recorded; like the real transport, a close
    first writes what is queued (kept in ``written``)."""

    def __init__(self):
        self.calls = []
        self.written = []
        self.out = None  # the session's queue, set by World

    def flush(self):
        self.written += self.out
        self.out.clear()
        return 0

    def close(self, code, reason):
        self.flush()
        self.calls.append(("close", code, reason))

    def abort(self):
        self.calls.append(("abort",))

    def gone(self):
        return False


async def _gate_can_add(principal, params, policy):
    await GATE.wait()
    return params["id"] != 0


GATE = None
GATED = Plugin("gated", page_types=[PageType("gated", ("id",), "gated-{id}", _gate_can_add)])


class World:
    """A hub, hooks and context as a server builds them, and the sessions made in it."""

    def __init__(self, authenticator=None, **overrides):
        self.settings = Settings(**{"jwt_secret": SECRET, **overrides})
        self.directory = Directory({"workspaces": {"1": [1, 2]}, "tables": {"10": 1, "20": 2}})
        self.registry = Registry(builtin_plugins() + [test_plugin, GATED])
        self.hub = Hub()
        self.scheduled = []
        self.hub.bind(self.scheduled.append)  # flushes are not run: the test reads the queues
        self.left = []
        self.auth_failures = 0
        hooks = Hooks(authenticator or JWTAuthenticator(self.settings), self.directory)
        self.ctx = SessionContext(self.hub, hooks, self.registry, self.settings,
                                  left=self.left.append, auth_failed=self._failed)

    def new(self):
        session = Session(self.ctx, Wire())
        session.transport.out = session.out
        return session

    def _failed(self):
        self.auth_failures += 1

    def session(self, token=None, user_id=1):
        session = self.new()
        assert session.authenticate(make_token(user_id) if token is None else token) is None
        return session


def sent(session):
    """The queued frames, decoded (text frames as JSON, the ping as "PING")."""
    decoded = []
    frames = session.transport.written + session.data_to_send()
    session.transport.written = []
    for frame in frames:
        if frame == PING_FRAME:
            decoded.append("PING")
            continue
        assert frame[0] == 0x81
        n, offset = frame[1], 2
        if n == 126:
            n, offset = int.from_bytes(frame[2:4], "big"), 4
        assert len(frame) == offset + n
        decoded.append(ujson.loads(frame[offset:]))
    return decoded


def text(session, obj):
    return session.receive_frame(TEXT, obj if isinstance(obj, str) else ujson.dumps(obj))


# --- authentication -----------------------------------------------------------------------------

def test_a_valid_token_opens_the_session():
    world = World()
    s = world.session()
    assert s.state is State.OPEN and s.user_id == 1
    (auth,) = sent(s)
    assert auth == {"type": "authentication", "success": True, "web_socket_id": s.web_socket_id}
    assert world.hub.connections == {s.web_socket_id: s} and world.hub.users == {1: {s}}
    assert s.transport.calls == []


@pytest.mark.parametrize("token", ["bad", "", None, make_token(1, secret="x" * 40)])
def test_a_bad_token_gets_the_refusal_then_4001(token):
    world = World()
    s = world.new()
    assert s.authenticate(token) is None
    assert sent(s) == [{"type": "authentication", "success": False, "web_socket_id": None}]
    assert s.transport.calls == [("close", closecodes.AUTHENTICATION_FAILED, "authentication failed")]
    assert s.state is State.CLOSING and world.hub.connections == {} and world.auth_failures == 1


def test_anonymous_follows_the_setting():
    assert World(allow_anonymous=True).session("anonymous").user_id is None
    refused = World(allow_anonymous=False).session("anonymous")
    assert refused.state is State.CLOSING and refused.transport.calls[0][1] == 4001


def test_per_user_limit_and_shutdown():
    world = World(max_connections_per_user=1)
    world.session(user_id=1)
    second = world.session(user_id=1)
    assert second.transport.calls == [("close", closecodes.TRY_AGAIN_LATER, "too many connections for this user")]
    world.ctx.closing = True
    late = world.session(user_id=2)
    assert late.transport.calls == [("close", closecodes.GOING_AWAY, "server shutting down")]
    assert sent(second) == sent(late) == []


def test_an_async_authenticator_answers_later_and_a_raising_one_refuses(caplog):
    async def authenticator(token):
        await asyncio.sleep(0)
        if token == "boom":
            raise ValueError(f"cannot read {token}")
        return int(token)

    world = World(authenticator=authenticator)
    s = world.new()
    waiting = s.authenticate("7")
    assert waiting is not None and s.state is State.AUTHENTICATING and sent(s) == []
    asyncio.run(waiting)
    assert s.state is State.OPEN and s.user_id == 7 and sent(s)[0]["success"] is True

    boom = world.new()
    asyncio.run(boom.authenticate("boom"))
    assert boom.state is State.CLOSING and sent(boom)[0]["success"] is False
    assert "boom" not in caplog.text and "authenticator raised" in caplog.text


def test_the_client_leaving_during_authentication_opens_nothing():
    async def authenticator(token):
        await asyncio.sleep(0)
        return 1

    world = World(authenticator=authenticator)
    s = world.new()
    waiting = s.authenticate("x")
    s.connection_lost()
    asyncio.run(waiting)
    assert s.state is State.CLOSED and world.hub.connections == {} and sent(s) == []


# --- pages ------------------------------------------------------------------------------------------

def test_page_and_remove_page():
    world = World()
    s = world.session()
    sent(s)
    assert text(s, {"page": "table", "table_id": 10}) is None
    assert sent(s) == [{"type": "page_add", "page": "table", "parameters": {"table_id": 10}}]
    assert world.hub.groups == {"table-10": {s}}
    text(s, {"page": "table", "table_id": 20})  # not a member of workspace 2: no answer
    text(s, {"page": "nope"})
    text(s, {"remove_page": "table", "table_id": 10})
    assert sent(s) == [{"type": "page_discard", "page": "table", "parameters": {"table_id": 10}}]
    assert world.hub.groups == {} and s.pages == {}


def test_page_then_remove_page_in_one_frame_keeps_that_order():
    world = World()
    s = world.session()
    sent(s)
    text(s, {"page": "table", "table_id": 10, "remove_page": "table"})
    assert [m["type"] for m in sent(s)] == ["page_add", "page_discard"]
    assert world.hub.groups == {}


@pytest.mark.parametrize("garbage", ["", "{", "[]", "1e999", '"page"', '{"page": 1}', '{"page": null}',
                                     '{"page": "table", "table_id": 1e999}', "\ud800"])
def test_garbage_gets_no_answer(garbage):
    world = World()
    s = world.session()
    sent(s)
    assert text(s, garbage) is None
    assert s.receive_frame(BINARY, b"\x00\x01") is None
    assert sent(s) == [] and s.state is State.OPEN and s.transport.calls == []


def test_too_many_subscriptions_closes_with_4008():
    world = World(max_subscriptions=2)
    s = world.session()
    sent(s)
    for row in (1, 2, 3):
        text(s, {"page": "row", "table_id": 10, "row_id": row})
    assert [m["type"] for m in sent(s)] == ["page_add", "page_add"]
    assert s.transport.calls == [("close", closecodes.POLICY_VIOLATION, "too many subscriptions")]
    assert world.hub.groups == {} and world.left == [s]
    text(s, {"page": "row", "table_id": 10, "row_id": 1})  # after closing: ignored
    assert sent(s) == [] and len(s.transport.calls) == 1


def test_an_async_access_check_subscribes_when_it_answers_and_not_after_a_close():
    global GATE
    world = World()

    async def run():
        global GATE
        GATE = asyncio.Event()
        s = world.session()
        sent(s)
        waiting = text(s, {"page": "gated", "id": 1, "remove_page": "gated"})
        assert waiting is not None and sent(s) == []  # nothing until the check answers
        GATE.set()
        await waiting
        assert [m["type"] for m in sent(s)] == ["page_add", "page_discard"]  # the frame's order

        GATE = asyncio.Event()
        waiting = text(s, {"page": "gated", "id": 2})
        s.close(closecodes.FORCE_DISCONNECT, "force disconnect")
        GATE.set()
        await waiting
        assert sent(s) == [] and world.hub.groups == {}

    asyncio.run(run())


def test_a_raising_access_check_refuses(caplog):
    def broken(principal, params, policy):
        raise RuntimeError("database down")

    world = World()
    world.registry.add(Plugin("broken", page_types=[PageType("broken", ("id",), "b-{id}", broken)]))
    s = world.session()
    sent(s)
    assert text(s, {"page": "broken", "id": 1}) is None
    assert sent(s) == [] and s.state is State.OPEN
    assert "access check of page 'broken' failed" in caplog.text


# --- limits --------------------------------------------------------------------------------------------

def test_incoming_rate_limit_counts_every_data_frame():
    world = World(max_incoming_rate=1, max_incoming_burst=3)
    s = world.session()
    sent(s)
    text(s, "x")
    s.receive_frame(BINARY, b"y")
    text(s, {"page": "table", "table_id": 10})
    assert s.state is State.OPEN
    text(s, "x")  # the fourth within far less than a second
    assert s.transport.calls == [("close", closecodes.POLICY_VIOLATION, "too many messages")]


def test_a_message_over_the_size_limit_closes_with_1009():
    world = World(max_message_size=100)
    s = world.session()
    text(s, "x" * 101)
    assert s.transport.calls == [("close", closecodes.MESSAGE_TOO_BIG, "message too big")]


# --- heartbeat and closing ------------------------------------------------------------------------------

def test_ping_pong_and_ping_timeout():
    world = World()
    s = world.session()
    sent(s)
    s.ping()
    assert sent(s) == ["PING"] and s.awaiting_pong
    s.receive_frame(PONG, b"")
    assert not s.awaiting_pong
    s.receive_frame(PING, b"hello")  # answered by the transport (Tornado), nothing queued here
    assert sent(s) == []
    s.ping()
    s.ping_timed_out()
    assert s.transport.calls == [("abort",)] and s.closed_by == "ping_timeout"
    assert s.out == [] and world.hub.connections == {} and world.left == [s]


def test_the_client_closing_and_the_connection_ending():
    world = World()
    s = world.session()
    text(s, {"page": "table", "table_id": 10})
    s.closing(None, True)  # the client's close frame, echoed by the transport
    assert s.state is State.CLOSING and s.closed_by is None and world.hub.groups == {}
    assert not s.disconnected
    s.connection_lost()
    assert s.state is State.CLOSED and s.disconnected and s.out == []
    assert world.left == [s]  # left once
    s.close(1000, "")
    assert s.transport.calls == []


def test_slow_consumer_is_dropped_without_a_close_frame():
    world = World()
    s = world.session()
    s.close(closecodes.SLOW_CONSUMER, "slow consumer")
    assert s.transport.calls == [("abort",)] and s.closed_by == closecodes.SLOW_CONSUMER


def test_an_idle_session_is_small():
    world = World()
    s = world.session()
    sent(s)
    assert not hasattr(s, "__dict__")
    size = sys.getsizeof(s) + sys.getsizeof(s.pages) + sys.getsizeof(s.out)
    assert size < 400, size


def test_refused_tokens_are_counted_with_their_reason(monkeypatch):
    from tornado_rt import refusals
    fresh = refusals.Refusals()
    monkeypatch.setattr(refusals, "REFUSALS", fresh)
    World(allow_anonymous=False).session("anonymous")
    World().new().authenticate("")
    world = World()
    world.ctx.hooks.authenticator = None
    world.new().authenticate("some-token")
    World().session("not-a-jwt")
    assert fresh.counts() == {("token", "anonymous_disabled"): 1, ("token", "missing"): 1,
                              ("token", "no_authenticator"): 1, ("token", "malformed"): 1}


# --- refusals: the session's decisions, counted by reason (docs/protocol.md, "Refusals") ---------------

@pytest.fixture
def fresh_refusals(monkeypatch):
    from tornado_rt import refusals
    fresh = refusals.Refusals()
    monkeypatch.setattr(refusals, "REFUSALS", fresh)
    return fresh


REFUSED_FRAMES = [
    ('{"page": "nope"}', ("subscription", "unknown_page_type")),
    ({"page": "table"}, ("subscription", "missing_parameter")),
    ('{"page": "table", "table_id": NaN}', ("subscription", "invalid_parameter")),
    ({"page": "table", "table_id": 99}, ("subscription", "unknown_table")),
    ({"page": "table", "table_id": 20}, ("subscription", "not_a_member")),
    ({"page": "row", "table_id": 20, "row_id": 1}, ("subscription", "not_a_member")),
    ({"page": "view", "slug": "nope"}, ("subscription", "unknown_view")),
    ("{nope", ("frame", "not_json")),
    ("3", ("frame", "not_an_object")),
    ('{"table_id": 10}', ("frame", "no_action")),
]


@pytest.mark.parametrize("frame, counted", REFUSED_FRAMES)
def test_each_refusal_is_counted_with_its_reason_and_answers_nothing(frame, counted, fresh_refusals):
    world = World()
    s = world.session(user_id=1)
    sent(s)
    assert text(s, frame) is None
    assert sent(s) == [] and s.pages == {} and s.state is State.OPEN
    assert fresh_refusals.counts() == {counted: 1}


def test_refusals_the_session_decides_itself(fresh_refusals):
    world = World()
    anon = world.session("anonymous")
    text(anon, {"page": "table", "table_id": 10})
    s = world.session(user_id=1)
    assert s.receive_frame(BINARY, b"\x00") is None
    world.directory.set_public_view("locked", 10, token="pw")
    text(s, {"page": "view", "slug": "locked", "token": "wrong"})
    assert fresh_refusals.counts() == {("subscription", "anonymous_not_allowed"): 1, ("frame", "binary"): 1,
                                       ("subscription", "bad_token"): 1}


def test_an_async_denial_is_counted_when_it_answers(fresh_refusals):
    global GATE
    GATE = asyncio.Event()
    world = World()
    s = world.session(user_id=1)
    sent(s)
    waiting = text(s, {"page": "gated", "id": 0})
    assert waiting is not None and fresh_refusals.counts() == {}
    GATE.set()
    asyncio.run(_await(waiting))
    assert fresh_refusals.counts() == {("subscription", "access_denied"): 1} and sent(s) == []


async def _await(awaitable):
    await awaitable


def test_error_frames_name_the_code_and_hide_what_the_access_check_knows(fresh_refusals):
    world = World(error_frames=True)
    s = world.session(user_id=1)
    sent(s)
    text(s, {"page": "table", "table_id": 99})
    text(s, {"page": "table", "table_id": 20})
    text(s, {"page": "nope"})
    text(s, "[]")
    codes = [(f["code"], f.get("page")) for f in sent(s)]
    assert codes == [("access_denied", "table"), ("access_denied", "table"), ("unknown_page_type", "nope"),
                     ("not_an_object", None)]
    assert fresh_refusals.counts() == {("subscription", "unknown_table"): 1, ("subscription", "not_a_member"): 1,
                                       ("subscription", "unknown_page_type"): 1, ("frame", "not_an_object"): 1}


def test_an_authenticator_answering_none_is_counted_but_the_jwt_one_counts_itself(fresh_refusals):
    World(authenticator=lambda token: None).new().authenticate("t")
    World(authenticator=lambda token: 1.5).new().authenticate("t")  # not an id: refused too
    World().new().authenticate(make_token(1, secret="y" * 40))  # JWTAuthenticator: its own reason only
    World(authenticator=lambda token: 5).session("t")
    assert fresh_refusals.counts() == {("token", "authenticator_refused"): 2, ("token", "bad_signature"): 1}


def test_a_denial_cannot_log_a_credential_or_break_the_line(fresh_refusals, caplog):
    from tornado_rt.refusals import Denied
    for key in ("token", "user_id", "page"):
        with pytest.raises(ValueError):
            Denied("mine", **{key: "x"})

    def own_reason(principal, params, policy):
        return Denied("suspended", until="x" * 500) if params["id"] == 1 else Denied("oops", token="secret-value")
    world = World(error_frames=True)
    world.registry.page_types["own"] = PageType("own", ("id",), "own-{id}", own_reason)
    s = world.session(user_id=1)
    sent(s)
    with caplog.at_level("INFO", logger="tornado_rt.refusals"):
        text(s, {"page": "own", "id": 1})
        text(s, {"page": "own", "id": 2})  # the check raised building its Denied: access_error
    assert [f["code"] for f in sent(s)] == ["access_denied", "access_denied"]  # the client learns no more
    assert fresh_refusals.counts() == {("subscription", "suspended"): 1, ("subscription", "access_error"): 1}
    lines = "\n".join(r.getMessage() for r in caplog.records if r.name == "tornado_rt.refusals")
    assert "reason=suspended page='own' parameters={'id': 1} user_id=1 until='" + "x" * 64 + "...(500 chars)'" \
        in lines
    assert "secret-value" not in lines
