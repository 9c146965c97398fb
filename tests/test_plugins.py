"""Plugins: a third-party plugin's page and message types, entry-point discovery (a real
importlib.metadata lookup over a dist-info put on sys.path), and name conflicts."""
import logging
import textwrap

import pytest

from tornado_rt import ENTRY_POINT_GROUP, MessageType, PageType, Plugin, RealtimeServer, Registry
from tornado_rt.registry import entry_point_plugins

from conftest import SECRET, test_plugin


# --- the third-party test plugin (conftest.test_plugin) ------------------------------------------

@pytest.mark.gen_test
async def test_third_party_dashboard_page_and_message(server, connect, barrier):
    a = await connect(user_id=1)
    b = await connect(user_id=4)
    anon = await connect(token="anonymous")
    reply = await a.subscribe("dashboard", dashboard_id=5, other="ignored")
    assert reply == {"type": "page_add", "page": "dashboard", "parameters": {"dashboard_id": 5}}
    await b.subscribe("dashboard", dashboard_id=6)
    await anon.send({"page": "dashboard", "dashboard_id": 5})
    await barrier(a, b, anon)
    msg = {"type": "dashboard_updated", "dashboard_id": 5, "widgets": [1, 2]}
    server.publish(msg)
    assert await a.recv() == msg
    await barrier(a, b, anon)
    await a.send({"remove_page": "dashboard", "dashboard_id": 5})
    assert await a.recv() == {"type": "page_discard", "page": "dashboard", "parameters": {"dashboard_id": 5}}
    server.publish(msg)
    await barrier(a, b, anon)


def test_third_party_message_type_validation(server):
    from tornado_rt import PublishError
    with pytest.raises(PublishError) as err:
        server.publish({"type": "dashboard_updated"})
    assert err.value.message_type == "dashboard_updated" and err.value.field == "message.dashboard_id"


# --- entry points --------------------------------------------------------------------------------

WIDGETS_MODULE = '''
from tornado_rt import MessageType, PageType, Plugin


def _can_add(principal, params, policy):
    return principal.user_id is not None


plugin = Plugin("widgets", page_types=[PageType("widget", ("widget_id",), "widget-{widget_id}", _can_add)],
                message_types=[MessageType("widget_moved", "page", page="widget",
                                           keys={"widget_id": "widget_id"}, payload=("widget_id", "x"))])


def make_plugin():
    return Plugin("gadgets", message_types=[MessageType("gadget_ping")])


not_a_plugin = 42
'''


@pytest.fixture
def widget_dist(tmp_path, monkeypatch):
    """An installed distribution 'widgets' with entry points in group tornado_rt.plugins."""
    (tmp_path / "rt_widgets_plugin.py").write_text(WIDGETS_MODULE)
    info = tmp_path / "rt_widgets-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rt-widgets\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [{ENTRY_POINT_GROUP}]
        widgets = rt_widgets_plugin:plugin
        gadgets = rt_widgets_plugin:make_plugin
        broken = rt_widgets_plugin_missing:plugin
        wrong = rt_widgets_plugin:not_a_plugin

        [console_scripts]
        unrelated = rt_widgets_plugin:plugin
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "rt_widgets_plugin", raising=False)
    return tmp_path


def test_entry_point_plugins_are_discovered(widget_dist, caplog):
    with caplog.at_level(logging.ERROR, logger="tornado_rt.registry"):
        found = {p.name: p for p in entry_point_plugins()}
    assert {"widgets", "gadgets"} <= set(found)
    assert [pt.name for pt in found["widgets"].page_types] == ["widget"]
    assert [mt.name for mt in found["gadgets"].message_types] == ["gadget_ping"]
    # broken entry points are logged and skipped, never fatal
    assert "broken" not in found and "wrong" not in found
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "'broken'" in logged and "'wrong'" in logged


def test_entry_point_plugins_exclude(widget_dist):
    names = [p.name for p in entry_point_plugins(exclude=["widgets", "broken", "wrong"])]
    assert "widgets" not in names and "gadgets" in names


def test_without_the_dist_nothing_is_discovered():
    names = {p.name for p in entry_point_plugins(exclude=["core", "database", "premium"])}
    assert not names & {"widgets", "gadgets"}


def test_builtin_plugins_are_advertised_as_entry_points():
    names = {p.name for p in entry_point_plugins()}
    assert {"core", "database", "premium"} <= names


class TestServerWithEntryPoints:
    @pytest.fixture
    def server(self, widget_dist, settings):
        srv = RealtimeServer(settings, plugins=[test_plugin])  # load_entry_points defaults to True
        srv.directory.set_workspace(1, [1])
        return srv

    def test_registry_holds_builtin_given_and_discovered_plugins(self, server):
        assert {"core", "database", "premium", "testing", "widgets", "gadgets"} <= set(server.registry.plugins)

    @pytest.mark.gen_test
    async def test_discovered_page_and_message_work_over_the_socket(self, server, connect, barrier):
        a = await connect(user_id=1)
        anon = await connect(token="anonymous")
        assert (await a.subscribe("widget", widget_id="w1"))["parameters"] == {"widget_id": "w1"}
        await anon.send({"page": "widget", "widget_id": "w1"})
        await barrier(a, anon)
        msg = {"type": "widget_moved", "widget_id": "w1", "x": 3}
        server.publish(msg)
        assert await a.recv() == msg
        server.publish({"type": "gadget_ping"}, {"user_ids": [1]})
        assert await a.recv() == {"type": "gadget_ping"}
        await barrier(a, anon)


def test_load_entry_points_false_skips_them(widget_dist):
    srv = RealtimeServer(jwt_secret=SECRET, load_entry_points=False)
    assert "widgets" not in srv.registry.plugins and "core" in srv.registry.plugins


# --- name conflicts ------------------------------------------------------------------------------

def _page(name):
    return PageType(name, ("id",), name + "-{id}", lambda principal, params, policy: True)


def test_conflicting_page_type_raises():
    reg = Registry([Plugin("a", page_types=[_page("board")])])
    with pytest.raises(ValueError, match="page type 'board' of plugin 'b' is already registered by 'a'"):
        reg.add(Plugin("b", page_types=[_page("board")]))


def test_conflicting_message_type_raises():
    reg = Registry([Plugin("a", message_types=[MessageType("ping")])])
    with pytest.raises(ValueError, match="message type 'ping'"):
        reg.add(Plugin("b", message_types=[MessageType("ping")]))


def test_alias_conflicting_with_a_name_raises():
    reg = Registry([Plugin("a", message_types=[MessageType("ping")])])
    with pytest.raises(ValueError, match="message type 'ping'"):
        reg.add(Plugin("b", message_types=[MessageType("pong", aliases=("ping",))]))


def test_duplicate_plugin_name_raises():
    reg = Registry([Plugin("a")])
    with pytest.raises(ValueError, match="plugin 'a' is already registered"):
        reg.add(Plugin("a"))


def test_duplicate_names_within_one_plugin_raise():
    with pytest.raises(ValueError, match="page type 'board'"):
        Registry([Plugin("a", page_types=[_page("board"), _page("board")])])
    with pytest.raises(ValueError, match="message type 'ping'"):
        Registry([Plugin("a", message_types=[MessageType("ping"), MessageType("other", aliases=("ping",))])])


def test_third_party_plugin_cannot_take_a_builtin_name():
    with pytest.raises(ValueError, match="page type 'table'"):
        RealtimeServer(jwt_secret=SECRET, load_entry_points=False, plugins=[Plugin("x", page_types=[_page("table")])])
    with pytest.raises(ValueError, match="message type 'rows_created'"):
        RealtimeServer(jwt_secret=SECRET, load_entry_points=False,
                       plugins=[Plugin("x", message_types=[MessageType("rows_created")])])
    with pytest.raises(ValueError, match="plugin 'core'"):
        RealtimeServer(jwt_secret=SECRET, load_entry_points=False, plugins=[Plugin("core")])


def test_a_refused_plugin_leaves_the_registry_unchanged():
    reg = Registry([Plugin("a", message_types=[MessageType("ping")])])
    bad = Plugin("b", page_types=[_page("board")], message_types=[MessageType("ping")])
    with pytest.raises(ValueError):
        reg.add(bad)
    assert "b" not in reg.plugins and reg.page_type("board") is None
    # nothing of the refused plugin is still claimed: a corrected plugin registers fine
    reg.add(Plugin("b", page_types=[_page("board")], message_types=[MessageType("pong")]))
    assert reg.page_type("board") is not None and reg.message_type("pong") is not None


def test_entry_point_plugin_conflicting_with_a_builtin_is_refused(tmp_path, monkeypatch):
    (tmp_path / "rt_clash_plugin.py").write_text(
        "from tornado_rt import MessageType, Plugin\n"
        "plugin = Plugin('clash', message_types=[MessageType('rows_created')])\n")
    info = tmp_path / "rt_clash-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rt-clash\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nclash = rt_clash_plugin:plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="message type 'rows_created' of plugin 'clash'"):
        RealtimeServer(jwt_secret=SECRET)
