"""Page and message types declared in configuration (``--types FILE`` and the config file's
``[[page_types]]`` / ``[[message_types]]``): end to end through a real ``tornado-rt serve``, and
every kind of declaration error refused at start with exit 2 naming the file, the entry and the key."""
import json
import textwrap

import pytest

from standalone import API_KEY, SECRET, Api, ServeProcess, WsClient, clean_env, run_cli
from tornado_rt import PageType, Principal, cli
from tornado_rt.policy import Directory
from tornado_rt.typesconfig import TypesConfigError, load_types, load_types_file

BASE = ["serve", "--port", "0", "--jwt-secret", SECRET, "--api-key", API_KEY]

TYPES = """\
[[page_types]]
name = "dashboard"
parameters = ["dashboard_id"]
group = "dashboard-{dashboard_id}"
access = "authenticated"

[[page_types]]
name = "project"
parameters = ["workspace_id", "project_id"]
group = "project-{workspace_id}-{project_id}"
access = "workspace_member"
workspace_of = "workspace_id"

[[page_types]]
name = "ticker"
parameters = []
group = "ticker"
access = "anyone"

[[message_types]]
name = "dashboard_widget_updated"
audience = "page"
page = "dashboard"
keys = { dashboard_id = "dashboard_id" }
payload = ["dashboard_id", "widget"]

[[message_types]]
name = "project_renamed"
audience = "page"
page = "project"
keys = { workspace_id = "project.workspace_id", project_id = "project.id" }
payload = ["project"]

[[message_types]]
name = "ticker_tick"
audience = "page"
page = "ticker"
"""

# In the config file itself: a workspace-wide message type and one naming a built-in page.
CONFIG = f"""\
jwt_secret = "{SECRET}"
api_keys = ["{API_KEY}"]
port = 0

[[message_types]]
name = "workspace_announcement"
audience = "workspace"
keys = {{ workspace_id = "workspace_id" }}
payload = ["text"]

[[message_types]]
name = "table_comment_added"
audience = "page"
page = "table"
keys = {{ table_id = "comment.table_id" }}
payload = ["comment"]
"""


@pytest.mark.gen_test(timeout=60)
async def test_configured_types_are_published_and_received_through_tornado_rt_serve(tmp_path):
    types = tmp_path / "types.toml"
    types.write_text(TYPES)
    config = tmp_path / "rt.toml"
    config.write_text(CONFIG)
    proc = ServeProcess(["serve", "--config", str(config), "--types", str(types)])
    try:
        api = Api(proc.base)
        await api.ok("PUT", "/api/directory", {"workspaces": {"1": [1, 2]}, "tables": {"5": 1}})
        one = await WsClient.connect(proc.ws_url, user_id=1)
        two = await WsClient.connect(proc.ws_url, user_id=2)
        three = await WsClient.connect(proc.ws_url, user_id=3)
        anon = await WsClient.connect(proc.ws_url, token="anonymous", name="anonymous")

        # access = "authenticated": any user; the id is canonical ("7" and 7 are one page).
        assert await one.subscribe("dashboard", dashboard_id=7) == {
            "type": "page_add", "page": "dashboard", "parameters": {"dashboard_id": 7}}
        await two.subscribe("dashboard", dashboard_id="8")
        await three.subscribe("dashboard", dashboard_id="7")
        widget = {"type": "dashboard_widget_updated", "dashboard_id": "7", "widget": {"id": 3, "title": "Sales"}}
        assert await api.publish({"message": widget}) == {"published": 1, "delivered": 2}  # one, three
        assert await one.recv() == widget
        assert await three.recv() == widget
        await api.barrier(one, two, three, anon)  # dashboard 8 got nothing

        # access = "workspace_member": user 3 is refused (the next frame is the reply to the
        # following allowed subscription), users 1 and 2 are admitted.
        await one.subscribe("project", workspace_id=1, project_id=4)
        await three.send({"page": "project", "workspace_id": 1, "project_id": 4})
        assert (await three.subscribe("ticker"))["page"] == "ticker"
        renamed = {"type": "project_renamed", "project": {"id": 4, "workspace_id": 1, "name": "Q3"}}
        await api.publish({"message": renamed})
        assert await one.recv() == renamed
        await api.barrier(one, two, three, anon)

        # access = "anyone": an anonymous connection may subscribe; a type with no payload keys.
        await anon.subscribe("ticker")
        tick = {"type": "ticker_tick"}
        await api.publish({"message": tick})
        assert await anon.recv() == tick
        assert await three.recv() == tick

        # Types from the config file: a workspace audience and a built-in page.
        note = {"type": "workspace_announcement", "workspace_id": 1, "text": "hello"}
        await api.publish({"message": note})
        assert await one.recv() == note
        assert await two.recv() == note
        await two.subscribe("table", table_id=5)
        comment = {"type": "table_comment_added", "comment": {"table_id": 5, "text": "hi"}}
        await api.publish({"message": comment})
        assert await two.recv() == comment
        await api.barrier(one, two, three, anon)

        # GET /api/types lists the configured types with the built-in ones.
        catalogue = await api.ok("GET", "/api/types", key=None)
        pages = {p["page"]: p for p in catalogue["page_types"]}
        assert pages["project"]["plugin"] == f"types:{types}"
        assert pages["project"]["parameters"] == ["workspace_id", "project_id"]
        messages = {m["type"]: m for m in catalogue["message_types"]}
        assert messages["workspace_announcement"]["plugin"] == f"types:{config}"
        assert messages["dashboard_widget_updated"]["required"] == ["type", "dashboard_id", "widget"]
        assert messages["rows_created"]["plugin"] == "database"

        # The payload contract holds: a missing key is a 400 naming it.
        status, body, _ = await api.call("POST", "/api/publish", {"message": {"type": "dashboard_widget_updated",
                                                                             "dashboard_id": 7}})
        assert status == 400 and body["field"] == "message.widget", body
        for client in (one, two, three, anon):
            client.close()
    finally:
        assert await proc.stopped() == 0, proc.output()
    log = proc.stderr()
    assert f"configured types from {types}: page types [dashboard, project, ticker]; message types " \
           "[dashboard_widget_updated, project_renamed, ticker_tick]" in log, log
    assert f"configured types from {config}: page types []; message types " \
           "[workspace_announcement, table_comment_added]" in log, log
    assert "plugin database: 3 page types" in log, log


def test_tornado_rt_types_lists_the_configured_types(tmp_path):
    types = tmp_path / "types.toml"
    types.write_text(TYPES + '[[page_types]]\nname = "secret"\nparameters = []\ngroup = "s"\naccess = "webhook"\n')
    config = tmp_path / "rt.toml"
    config.write_text(CONFIG)
    result = run_cli(["types", "--json", "--config", str(config), "--types", str(types)])
    assert result.returncode == 0, result
    catalogue = json.loads(result.stdout)
    plugins = {m["type"]: m["plugin"] for m in catalogue["message_types"]}
    assert plugins["ticker_tick"] == f"types:{types}" and plugins["table_comment_added"] == f"types:{config}"
    assert {p["page"] for p in catalogue["page_types"]} >= {"dashboard", "project", "ticker", "secret", "table"}
    result = run_cli(["types", "--types", str(tmp_path / "nope.toml")])
    assert result.returncode == 2 and result.stderr.startswith(f"tornado-rt: error: --types: {tmp_path}"), result


# --- refusals ---------------------------------------------------------------------------------------

PAGE = 'name = "dash"\nparameters = ["dash_id"]\ngroup = "dash-{dash_id}"\naccess = "authenticated"\n'


def page(extra="", **replace):
    lines = dict(line.split(" = ", 1) for line in PAGE.strip().splitlines())
    for key, value in replace.items():
        if value is None:
            lines.pop(key, None)
        else:
            lines[key] = value
    return "[[page_types]]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items()) + extra


def message(body):
    return "[[message_types]]\n" + textwrap.dedent(body)


# (id, types file text, entry that must be named, key that must be named)
TYPE_ERRORS = [
    ("not-toml", "[[page_types]\nname = ", None, "not valid TOML"),
    ("unknown-top-key", "[[page_type]]\nname = \"x\"\n", None, "page_type"),
    ("page-not-a-table", "page_types = [1]\n", "page_types[0]", None),
    ("page-missing-name", page(name=None), "page_types[0]", "name"),
    ("page-unknown-key", page('acess = "anyone"\n'), "page_types[0] (dash)", "acess"),
    ("page-parameters-not-a-list", page(parameters='"dash_id"'), "page_types[0] (dash)", "parameters"),
    ("page-bad-parameter-name", page(parameters='["dash id"]'), "page_types[0] (dash)", "parameters"),
    ("page-group-missing", page(group=None), "page_types[0] (dash)", "group"),
    ("page-group-unknown-parameter", page(group='"dash-{board}"'), "page_types[0] (dash)", "group"),
    ("page-group-attribute-access", page(group='"dash-{dash_id.__class__}"'), "page_types[0] (dash)", "group"),
    ("page-group-bad-template", page(group='"dash-{dash_id"'), "page_types[0] (dash)", "group"),
    ("page-required-not-a-parameter", page(required='["x"]'), "page_types[0] (dash)", "required"),
    ("page-permission-group-unknown", page('permission_group = "p-{x}"\n'), "page_types[0] (dash)",
     "permission_group"),
    ("page-access-missing", page(access=None), "page_types[0] (dash)", "access"),
    ("page-access-unknown", page(access='"everyone"'), "page_types[0] (dash)", "access"),
    ("page-member-without-workspace-of", page(access='"workspace_member"'), "page_types[0] (dash)",
     "workspace_of"),
    ("page-workspace-of-unknown", page('workspace_of = "ws_id"\n', access='"workspace_member"'),
     "page_types[0] (dash)", "workspace_of"),
    ("page-workspace-of-wrong-access", page('workspace_of = "dash_id"\n'), "page_types[0] (dash)", "workspace_of"),
    ("page-webhook-without-url", page(access='"webhook"'), "page_types[0] (dash)", "access"),
    ("page-anonymous-not-webhook", page("anonymous = true\n"), "page_types[0] (dash)", "anonymous"),
    ("page-reserved-parameter", page(parameters='["page"]', group='"dash"'), "page_types[0] (dash)",
     "parameters"),
    ("page-declared-twice", page() + page(), "page_types[1] (dash)", "name"),
    ("page-name-taken-by-builtin", page(name='"table"'), "page_types[0] (table)", "name"),
    ("message-missing-audience", message('name = "m"\n'), "message_types[0] (m)", "audience"),
    ("message-unknown-audience", message('name = "m"\naudience = "server"\n'), "message_types[0] (m)",
     "audience"),
    ("message-unknown-key", message('name = "m"\naudience = "explicit"\npayloads = ["a"]\n'),
     "message_types[0] (m)", "payloads"),
    ("message-page-missing", message('name = "m"\naudience = "page"\n'), "message_types[0] (m)", "page"),
    ("message-page-unknown", message('name = "m"\naudience = "page"\npage = "nope"\nkeys = { a = "a" }\n'),
     "message_types[0] (m)", "page"),
    ("message-keys-miss-a-parameter", page() + message('name = "m"\naudience = "page"\npage = "dash"\n'),
     "message_types[0] (m)", "keys"),
    ("message-key-not-a-parameter",
     page() + message('name = "m"\naudience = "page"\npage = "dash"\nkeys = { dash_id = "d", x = "x" }\n'),
     "message_types[0] (m)", "keys.x"),
    ("message-key-path-not-a-string",
     page() + message('name = "m"\naudience = "page"\npage = "dash"\nkeys = { dash_id = 3 }\n'),
     "message_types[0] (m)", "keys.dash_id"),
    ("message-key-not-a-parameter-of-a-builtin-page",
     message('name = "m"\naudience = "page"\npage = "table"\nkeys = { table_id = "t", row_id = "r" }\n'),
     "message_types[0] (m)", "keys.row_id"),
    ("message-workspace-without-key", message('name = "m"\naudience = "workspace"\n'), "message_types[0] (m)",
     "keys"),
    ("message-explicit-with-keys", message('name = "m"\naudience = "explicit"\nkeys = { a = "a" }\n'),
     "message_types[0] (m)", "keys.a"),
    ("message-payload-not-a-list", message('name = "m"\naudience = "explicit"\npayload = "a"\n'),
     "message_types[0] (m)", "payload"),
    ("message-name-taken-by-builtin", message('name = "rows_created"\naudience = "explicit"\n'),
     "message_types[0] (rows_created)", "name"),
    ("message-declared-twice", message('name = "m"\naudience = "explicit"\n') * 2, "message_types[1] (m)", "name"),
]


@pytest.mark.parametrize("case", TYPE_ERRORS, ids=[c[0] for c in TYPE_ERRORS])
def test_a_bad_types_file_is_refused_naming_file_entry_and_key(tmp_path, capsys, case):
    _, text, entry, key = case
    path = tmp_path / "types.toml"
    path.write_text(text)
    code = cli.main(BASE + ["--types", str(path)])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"tornado-rt: error: --types: {path}: "), line
    if entry is not None:
        assert f": {entry}: " in line, line
    if key is not None:
        assert key in line.split(f"{entry}: ", 1)[-1], line
    assert "tornado-rt listening" not in out


def test_access_pages_need_the_webhook_and_a_registered_page():
    result = run_cli(BASE + ["--access-page", "table"])
    assert result.returncode == 2, result
    assert result.stderr.strip() == "tornado-rt: error: --access-page: needs the access webhook (--access-url URL)"
    result = run_cli(BASE + ["--access-url", "http://127.0.0.1:9/", "--access-page", "tabel"])
    assert result.returncode == 2, result
    line = result.stderr.strip()
    assert line.startswith("tornado-rt: error: --access-page: page type 'tabel' is not registered (known: "), line
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = run_cli(BASE + ["--access-url", "ftp://127.0.0.1/"])
    assert result.returncode == 2 and "--access-url: must be an http:// or https:// URL" in result.stderr, result


def test_types_in_the_config_file_are_checked_the_same_way(tmp_path, capsys):
    config = tmp_path / "rt.toml"
    config.write_text(f'jwt_secret = "{SECRET}"\napi_keys = ["{API_KEY}"]\n' + page(access='"sometimes"'))
    assert cli.main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tornado-rt: error: --config: {config}: page_types[0] (dash): access: must be one of "
                   "anyone, authenticated, workspace_member, webhook, got 'sometimes'"), err


def test_a_missing_types_file_is_refused_by_the_real_command_with_exit_2(tmp_path):
    missing = tmp_path / "nope.toml"
    result = run_cli(BASE + ["--types", str(missing)])
    assert result.returncode == 2, result
    assert result.stderr.strip().startswith(f"tornado-rt: error: --types: {missing}: cannot read the file"), \
        result.stderr
    path = tmp_path / "types.toml"
    path.write_text(page(group='"dash-{x}"'))
    result = run_cli(BASE, env=clean_env(TORNADO_RT_TYPES=str(path)))
    assert result.returncode == 2, result
    assert result.stderr.strip().startswith(
        f"tornado-rt: error: TORNADO_RT_TYPES (--types): {path}: page_types[0] (dash): group: {{x}}"), result.stderr


# --- the Python API (no sockets: pure declaration logic) -------------------------------------------------

def test_load_types_from_a_dict_and_a_file_give_equal_types(tmp_path):
    table = {"page_types": [{"name": "board", "parameters": ["board_id", "tab"], "required": ["board_id"],
                             "group": "board-{board_id}", "permission_group": "perm-board-{board_id}",
                             "access": "anyone"}],
             "message_types": [{"name": "board_moved", "audience": "user_workspaces",
                                "keys": {"user_id": "owner.id"}, "also_user": "mover", "aliases": ["board_move"]}]}
    plugin = load_types(table, name="boards")
    assert plugin.name == "boards"
    (pt,) = plugin.page_types
    assert (pt.parameters, pt.required, pt.anonymous) == (("board_id", "tab"), ("board_id",), True)
    assert pt.group({"board_id": "7", "tab": None}) == pt.group({"board_id": 7, "tab": "x"}) == "board-7"
    assert pt.permission_group({"board_id": 7, "tab": None}) == "perm-board-7"
    (mt,) = plugin.message_types
    assert (mt.audience, mt.keys, mt.also_user, mt.aliases) == ("user_workspaces", {"user_id": "owner.id"},
                                                                "mover", ("board_move",))
    path = tmp_path / "t.toml"
    path.write_text('[[page_types]]\nname = "board"\nparameters = ["board_id"]\ngroup = "board-{board_id}"\n'
                    'access = "authenticated"\n')
    from_file = load_types_file(str(path))
    assert from_file.name == f"types:{path}"
    assert from_file.page_types[0].anonymous is False
    with pytest.raises(TypesConfigError) as info:
        load_types({"page_types": [{"name": "b", "parameters": [], "group": "b", "access": "webhook"}]},
                   source="mine")
    assert (info.value.source, info.value.entry, info.value.key) == ("mine", "page_types[0] (b)", "access")


def check(pt: PageType, user, params, policy):
    return pt.check(Principal(user), pt.params_from(params), policy)


def test_workspace_member_access_reads_the_policy():
    plugin = load_types({"page_types": [
        {"name": "p", "parameters": ["workspace_id"], "group": "p-{workspace_id}", "access": "workspace_member",
         "workspace_of": "workspace_id"},
        {"name": "t", "parameters": ["table_id"], "group": "t-{table_id}", "access": "workspace_member",
         "workspace_of": "table:table_id"}]})
    p, t = plugin.page_types
    directory = Directory({"workspaces": {"1": [10]}, "tables": {"5": 1, "6": 2}})
    assert check(p, 10, {"workspace_id": "1"}, directory) is True
    assert check(p, 11, {"workspace_id": 1}, directory) is False
    assert check(p, None, {"workspace_id": 1}, directory) is False
    assert check(t, 10, {"table_id": 5}, directory) is True
    assert check(t, 10, {"table_id": 6}, directory) is False
    assert check(t, 10, {"table_id": 99}, directory) is False
    assert p.anonymous is False and t.anonymous is False
