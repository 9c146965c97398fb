"""Model-based delivery test (issue 5): a hypothesis state machine drives random connects,
disconnects, subscribes, unsubscribes, membership changes (``group_user_added`` /
``group_user_deleted``), revocations, table deletions, force disconnects and publishes to every
audience kind (page ``table``/``row``/``view``, ``workspace``, ``workspaces``, ``users``,
``all_users``, ``individual``, the table's workspace, the user's workspaces), with sender
exclusion (``ignore_web_socket_id``) and ``exclude_user_ids``, against a live server and a small
pure-Python reference model of docs/protocol.md §4-§5. After every step each connection has received
exactly what the model says: no loss, no leak, no duplicate, order kept. The hub's indexes are
compared with the model too.

How each step's reads end deterministically:

* a client action (``page`` / ``remove_page``) is followed on the same connection by a probe,
  ``remove_page`` of a page type that always answers ``page_discard``; frames of one connection
  are handled in order, so once the probe's answer is read the action has taken effect;
* then a marker is published to ``all_users`` from the test thread; publishes from one thread
  reach the server's loop in order, so every connection's marker comes after everything the step
  sent it. Each connection is read up to its marker and must match the model exactly.

Messages the protocol sends in no defined order among themselves (the ``page_discard``s of one
revocation) are compared as a multiset; everything else in sequence.

The server runs on a dedicated thread with its own IOLoop (:class:`live_server.ServerThread`)
and the state machine talks to it with the synchronous ``websockets.sync.client``; this keeps
hypothesis away from pytest-tornado's loop. A fresh server is started for every example.
"""
import contextlib
import itertools
import json
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, precondition, rule,
                                 run_state_machine_as_test)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import SECRET, make_token, test_plugin
from live_server import ErrorLog, ServerThread
from tornado_rt import RealtimeServer, Settings

USERS = [1, 2, 3, 4]
WORKSPACES = {1: {1, 2}, 2: {2, 3}, 3: set()}   # user 4 starts in no workspace
TABLES = {10: 1, 11: 1, 20: 2, 30: 3}
VIEWS = {"pub": 10}
MAX_CONNECTIONS = 8

PAGES = ([("table", {"table_id": t}) for t in (10, 11, 20, 30, 99)]
         + [("row", {"table_id": t, "row_id": r}) for t in (10, 20) for r in (1, 2)]
         + [("view", {"slug": s, "token": None}) for s in ("pub", "nope")])

_counter = itertools.count(1)


def group_of(page, params):
    if page == "table":
        return f"table-{params['table_id']}"
    if page == "row":
        return f"table-{params['table_id']}-row-{params['row_id']}"
    return f"view-{params['slug']}"


def permission_group_of(page, params):
    return None if page == "view" else f"permissions-table-{params['table_id']}"


def page_message(kind, page, params):
    return {"type": kind, "page": page, "parameters": params}


class Conn:
    """A live client and the model's view of it."""

    def __init__(self, ws, user, web_socket_id):
        self.ws = ws
        self.user = user
        self.web_socket_id = web_socket_id
        self.pages = {}           # group -> (page, params, permission group), subscription order
        self.expected = []        # segments: ("seq", message) or ("bag", [messages])
        self.closing_code = None  # set when the model expects the server to close it

    def read_until(self, last):
        """Messages up to and including ``last`` (or to the close when ``last`` is None)."""
        received = []
        try:
            while True:
                msg = json.loads(self.ws.recv(timeout=10))
                received.append(msg)
                if msg == last:
                    return received, None
        except ConnectionClosed as closed:
            assert last is None, f"connection closed early; received {received}"
            return received, closed.rcvd.code if closed.rcvd else None


def check_segments(received, segments, who):
    flat = [m for kind, item in segments for m in ([item] if kind == "seq" else item)]
    assert len(received) == len(flat), f"{who}: expected {flat}\n got {received}"
    i = 0
    for kind, item in segments:
        if kind == "seq":
            assert received[i] == item, f"{who}: message {i}: expected {item}\n got {received}\n expected all {flat}"
            i += 1
        else:
            got = received[i:i + len(item)]
            key = lambda m: json.dumps(m, sort_keys=True)  # noqa: E731
            assert sorted(map(key, got)) == sorted(map(key, item)), f"{who}: expected (any order) {item}\n got {got}"
            i += len(item)


class DeliveryModel(RuleBasedStateMachine):
    thread: ServerThread = None  # set by the test

    def __init__(self):
        super().__init__()
        self.server, port = self.thread.serve(self.make_server)
        self.url = f"ws://127.0.0.1:{port}/ws/core/"
        self.exits = contextlib.ExitStack()
        self.conns = []
        self.members = {w: set(m) for w, m in WORKSPACES.items()}
        self.tables = dict(TABLES)
        self.views = dict(VIEWS)

    @staticmethod
    def make_server():
        server = RealtimeServer(Settings(jwt_secret=SECRET, ping_interval=0, max_incoming_rate=0),
                                plugins=[test_plugin], load_entry_points=False)
        d = server.directory
        for w, members in WORKSPACES.items():
            d.set_workspace(w, members)
        for t, w in TABLES.items():
            d.set_table(t, w)
        for slug, t in VIEWS.items():
            d.set_public_view(slug, t)
        return server

    def teardown(self):
        self.exits.close()
        self.thread.stop(self.server)

    # --- model helpers -----------------------------------------------------------------------------
    def conns_of(self, users):
        return [c for c in self.conns if c.user is not None and c.user in users]

    def workspaces_of(self, user):
        return [w for w, m in self.members.items() if user in m]

    def deliver(self, message, conns, ignore=None, exclude=()):
        for c in conns:
            if c.web_socket_id != ignore and (c.user is None or c.user not in exclude):
                c.expected.append(("seq", message))

    def drop(self, conns, permission_group):
        """The model of a revocation: each connection loses its pages in the permission group,
        with one page_discard each (in no defined order among themselves)."""
        for c in conns:
            dropped = [g for g, (_, _, pg) in c.pages.items() if pg == permission_group]
            discards = [page_message("page_discard", c.pages[g][0], c.pages[g][1]) for g in dropped]
            for g in dropped:
                del c.pages[g]
            if discards:
                c.expected.append(("bag", discards))

    def pick(self, index):
        return self.conns[index % len(self.conns)]

    def sender(self, index):
        """The connection to skip as the sender: a live one, or an id no connection has."""
        if index is None or not self.conns:
            return None
        if index < 0:
            return str(uuid.uuid4())
        return self.pick(index).web_socket_id

    # --- reading and checking ----------------------------------------------------------------------
    def sync(self):
        """Publish a marker to everyone and check every connection against the model."""
        marker = {"type": "test_marker", "n": next(_counter)}
        self.server.publish(marker, {"all_users": True})
        for c in list(self.conns):
            if c.closing_code is not None:
                received, code = c.read_until(None)
                check_segments(received, c.expected, f"conn {c.web_socket_id} (user {c.user})")
                assert code == c.closing_code
                self.conns.remove(c)
            else:
                received, _ = c.read_until(marker)
                check_segments(received, c.expected + [("seq", marker)], f"conn {c.web_socket_id} (user {c.user})")
            c.expected = []
        self.check_hub()

    def client_action(self, conn, message, expected):
        """Send a client message, then the probe; the replies must be exactly ``expected``."""
        probe = {"remove_page": "dashboard", "dashboard_id": f"probe-{next(_counter)}"}
        conn.ws.send(json.dumps(message))
        conn.ws.send(json.dumps(probe))
        answer = page_message("page_discard", "dashboard", {"dashboard_id": probe["dashboard_id"]})
        received, _ = conn.read_until(answer)
        assert received == expected + [answer]
        self.sync()

    def check_hub(self):
        def snapshot():
            hub = self.server.hub
            return ({w: (c.user_id, sorted(c.pages)) for w, c in hub.connections.items()},
                    {g: sorted(c.web_socket_id for c in m) for g, m in hub.groups.items()},
                    {u: sorted(c.web_socket_id for c in cs) for u, cs in hub.users.items()},
                    hub.anonymous)
        connections, groups, users, anonymous = self.thread.call(snapshot)
        assert connections == {c.web_socket_id: (c.user, sorted(c.pages)) for c in self.conns}
        model_groups = {}
        for c in self.conns:
            for g in c.pages:
                model_groups.setdefault(g, []).append(c.web_socket_id)
        assert groups == {g: sorted(ids) for g, ids in model_groups.items()}
        model_users = {}
        for c in self.conns:
            if c.user is not None:
                model_users.setdefault(c.user, []).append(c.web_socket_id)
        assert users == {u: sorted(ids) for u, ids in model_users.items()}
        assert anonymous == sum(1 for c in self.conns if c.user is None)

    # --- connections -------------------------------------------------------------------------------
    @initialize(pages=st.lists(st.sampled_from(PAGES), max_size=8))
    def everyone_connected(self, pages):
        """Start with one connection per user and an anonymous one, subscribed round-robin to
        ``pages``, so that exclusion and audiences have someone to act on from the first step."""
        for user in USERS + [None]:
            self.connect(user)
        for i, page in enumerate(pages):
            self.subscribe(i, page)

    @precondition(lambda self: len(self.conns) < MAX_CONNECTIONS)
    @rule(user=st.sampled_from(USERS + [None]))
    def connect(self, user):
        token = "anonymous" if user is None else make_token(user)
        ws = self.exits.enter_context(connect(f"{self.url}?jwt_token={token}"))
        auth = json.loads(ws.recv(timeout=10))
        assert auth["type"] == "authentication" and auth["success"] is True
        self.conns.append(Conn(ws, user, auth["web_socket_id"]))
        self.sync()

    @precondition(lambda self: self.conns)
    @rule(index=st.integers(0, MAX_CONNECTIONS - 1))
    def disconnect(self, index):
        conn = self.pick(index)
        conn.ws.close()  # returns once the server answered the close: it has left the hub
        self.conns.remove(conn)
        self.sync()

    @precondition(lambda self: self.conns)
    @rule(users=st.lists(st.sampled_from(USERS), min_size=1, max_size=2, unique=True),
          spare=st.one_of(st.none(), st.integers(0, MAX_CONNECTIONS - 1)))
    def force_disconnect(self, users, spare):
        spared = [self.pick(spare).web_socket_id] if spare is not None else []
        self.server.disconnect(users, spared)
        for c in self.conns_of(set(users)):
            if c.web_socket_id not in spared:
                c.expected.append(("seq", {"type": "force_disconnect"}))
                c.closing_code = 4003
        self.sync()

    # --- client messages ---------------------------------------------------------------------------
    @precondition(lambda self: self.conns)
    @rule(index=st.integers(0, MAX_CONNECTIONS - 1), page=st.sampled_from(PAGES))
    def subscribe(self, index, page):
        conn = self.pick(index)
        name, params = page
        message = {"page": name, **{k: v for k, v in params.items() if v is not None}}
        if name == "view":
            allowed = params["slug"] in self.views
        else:
            workspace = self.tables.get(params["table_id"])
            allowed = (conn.user is not None and workspace is not None
                       and conn.user in self.members[workspace])
        expected = []
        if allowed:
            group = group_of(name, params)
            conn.pages[group] = (name, params, permission_group_of(name, params))
            expected = [page_message("page_add", name, params)]
        self.client_action(conn, message, expected)

    @precondition(lambda self: self.conns)
    @rule(index=st.integers(0, MAX_CONNECTIONS - 1), page=st.sampled_from(PAGES))
    def unsubscribe(self, index, page):
        conn = self.pick(index)
        name, params = page
        message = {"remove_page": name, **{k: v for k, v in params.items() if v is not None}}
        conn.pages.pop(group_of(name, params), None)
        self.client_action(conn, message, [page_message("page_discard", name, params)])

    # --- publishing --------------------------------------------------------------------------------
    @rule(kind=st.sampled_from(["page_table", "page_row", "page_view", "workspace", "workspaces",
                                "users", "all", "table_workspace", "user_workspaces"]),
          which=st.integers(0, 100), sender=st.one_of(st.none(), st.integers(-1, MAX_CONNECTIONS - 1)),
          exclude=st.lists(st.sampled_from(USERS), max_size=2, unique=True))
    def publish(self, kind, which, sender, exclude):
        n = next(_counter)
        ignore = self.sender(sender)
        to = None
        if kind == "page_table":
            t = [10, 11, 20, 30][which % 4]
            msg = {"type": "rows_created", "table_id": t, "rows": [{"id": n}], "metadata": {},
                   "before_row_id": None}
            conns = [c for c in self.conns if f"table-{t}" in c.pages]
        elif kind == "page_row":
            t, r = [(10, 1), (10, 2), (20, 1)][which % 3]
            msg = {"type": "row_history_updated", "row_history_entry": {"n": n}, "table_id": t, "row_id": r}
            conns = [c for c in self.conns if f"table-{t}-row-{r}" in c.pages]
        elif kind == "page_view":
            msg, to = {"type": "force_view_refresh", "n": n}, {"page": "view", "slug": "pub"}
            conns = [c for c in self.conns if "view-pub" in c.pages]
        elif kind == "workspace":
            w = [1, 2, 3][which % 3]
            msg = {"type": "group_updated", "workspace_id": w, "workspace": {"id": w, "n": n}}
            conns = self.conns_of(self.members[w])
        elif kind == "workspaces":
            ws = [[1, 2], [2, 3], [1, 3], [3]][which % 4]
            msg, to = {"type": "group_updated", "workspace_id": 0, "workspace": {"n": n}}, {"workspace_ids": ws}
            conns = self.conns_of(set().union(*(self.members[w] for w in ws)))
        elif kind == "users":
            users = [u for i, u in enumerate(USERS) if which >> i & 1] or [4]
            msg, to = {"type": "notifications_created", "n": n}, {"user_ids": users}
            conns = self.conns_of(set(users))
        elif kind == "all":
            msg, to = {"type": "job_started", "n": n}, {"all_users": True}
            conns = list(self.conns)
        elif kind == "table_workspace":
            t = [10, 11, 20, 30, 99][which % 5]
            msg = {"type": "table_updated", "table_id": t, "table": {"id": t, "n": n}, "force_table_refresh": False}
            w = self.tables.get(t)
            conns = self.conns_of(self.members[w]) if w is not None else []
        else:  # user_workspaces
            u = USERS[which % 4]
            msg = {"type": "user_updated", "user": {"id": u, "username": "u", "first_name": str(n)}}
            conns = self.conns_of(set().union(set(), *(self.members[w] for w in self.workspaces_of(u))))
        self.server.publish(msg, to, ignore_web_socket_id=ignore, exclude_user_ids=exclude or None)
        self.deliver(msg, conns, ignore, exclude)
        self.sync()

    @rule(users=st.lists(st.sampled_from(USERS), min_size=1, max_size=4, unique=True),
          sender=st.one_of(st.none(), st.integers(0, MAX_CONNECTIONS - 1)))
    def publish_individual(self, users, sender):
        n = next(_counter)
        ignore = self.sender(sender)
        payloads = {u: {"type": "notifications_created", "n": n, "for": u} for u in users}
        self.server.publish_individual(payloads, ignore_web_socket_id=ignore)
        for u in users:
            self.deliver(payloads[u], self.conns_of({u}), ignore)
        self.sync()

    # --- membership, revocation, tables ------------------------------------------------------------
    @rule(w=st.sampled_from(sorted(WORKSPACES)), u=st.sampled_from(USERS),
          sender=st.one_of(st.none(), st.integers(0, MAX_CONNECTIONS - 1)),
          exclude=st.lists(st.sampled_from(USERS), max_size=1))
    def group_user_added(self, w, u, sender, exclude):
        n = next(_counter)
        ignore = self.sender(sender)
        msg = {"type": "group_user_added", "id": n, "workspace_id": w,
               "workspace_user": {"user_id": u, "permissions": "MEMBER"}}
        self.server.publish(msg, ignore_web_socket_id=ignore, exclude_user_ids=exclude or None)
        self.deliver(msg, self.conns_of(self.members[w] | {u}), ignore, exclude)
        self.members[w].add(u)
        self.sync()

    @rule(w=st.sampled_from(sorted(WORKSPACES)), u=st.sampled_from(USERS),
          sender=st.one_of(st.none(), st.integers(0, MAX_CONNECTIONS - 1)))
    def group_user_deleted(self, w, u, sender):
        n = next(_counter)
        ignore = self.sender(sender)
        msg = {"type": "group_user_deleted", "id": n, "workspace_id": w,
               "workspace_user": {"user_id": u, "permissions": "MEMBER"}}
        self.server.publish(msg, ignore_web_socket_id=ignore)
        self.deliver(msg, self.conns_of(self.members[w] | {u}), ignore)
        # §4: the user is revoked from the permission groups of every table of the workspace;
        # the page_discards of this one event come in no defined order
        bag_start = {id(c): len(c.expected) for c in self.conns}
        for t in [t for t, tw in self.tables.items() if tw == w]:
            self.drop(self.conns_of({u}), f"permissions-table-{t}")
        for c in self.conns:
            merge_bags(c, bag_start[id(c)])
        self.members[w].discard(u)
        self.sync()

    @rule(users=st.lists(st.sampled_from(USERS), min_size=1, max_size=3, unique=True),
          t=st.sampled_from([10, 11, 20, 30]))
    def revoke(self, users, t):
        self.server.revoke(users, f"permissions-table-{t}")
        self.drop(self.conns_of(set(users)), f"permissions-table-{t}")
        self.sync()

    @rule(t=st.sampled_from([10, 20]))
    def table_deleted(self, t):
        n = next(_counter)
        msg = {"type": "table_deleted", "database_id": n, "table_id": t}
        self.server.publish(msg)
        w = self.tables.get(t)
        self.deliver(msg, self.conns_of(self.members[w]) if w is not None else [])
        self.drop(self.conns, f"permissions-table-{t}")  # every subscriber, member or not
        for slug in [s for s, vt in self.views.items() if vt == t]:  # its public views go too
            for c in self.conns:
                if f"view-{slug}" in c.pages:
                    page, params, _ = c.pages.pop(f"view-{slug}")
                    c.expected.append(("bag", [page_message("page_discard", page, params)]))
        self.tables.pop(t, None)
        self.views = {s: vt for s, vt in self.views.items() if vt != t}
        self.sync()

    @precondition(lambda self: len(self.tables) < len(TABLES))
    @rule()
    def tables_restored(self):
        def restore(directory):
            for t, w in TABLES.items():
                directory.set_table(t, w)
            for slug, t in VIEWS.items():
                directory.set_public_view(slug, t)
        self.thread.call(restore, self.server.directory)
        self.tables = dict(TABLES)
        self.views = dict(VIEWS)
        self.sync()


def merge_bags(conn, start):
    """Make the bags appended since ``start`` one bag (they come from one event)."""
    tail = conn.expected[start:]
    if len(tail) > 1:
        conn.expected[start:] = [("bag", [m for _, bag in tail for m in bag])]


@pytest.fixture(scope="module")
def server_thread():
    thread = ServerThread()
    yield thread
    thread.close()


def test_delivery_matches_the_model(server_thread):
    DeliveryModel.thread = server_thread
    with ErrorLog() as errors:
        run_state_machine_as_test(DeliveryModel, settings=settings(
            max_examples=40, stateful_step_count=30, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow]))
    assert not errors.errors(), errors.errors()[0].getMessage()
