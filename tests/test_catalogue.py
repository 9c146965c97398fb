"""The message catalogue is generated from the registry and every view of it agrees with it:
``GET /api/types``, ``tornado-rt types [--json]``, the table in docs/protocol.md and the OpenAPI
``Message`` schema (one schema per publishable type, with its required keys). ``GET /api/docs``
renders the public OpenAPI document in a real headless browser."""
import json
import os
import subprocess
import sys

import pytest

from tools import need

from conftest import test_plugin
from standalone import API_KEY, Api, clean_env, run_cli
from tornado_rt.catalogue import (END_MARKER, START_MARKER, builtin_registry, catalogue, committed_block,
                                  markdown, serve_registry)
from tornado_rt.httpapi import make_app
from tornado_rt.openapi import MESSAGE_SCHEMA_PREFIX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL_MD = os.path.join(ROOT, "docs", "protocol.md")


@pytest.fixture
def app(server):
    return make_app(server, [API_KEY])


def check_against_registry(entries, registry):
    """Every registered message type (aliases included) is described exactly as registered."""
    by_name = {e["type"]: e for e in entries}
    assert len(by_name) == len(entries), "a type is listed twice"
    for name, mt in registry.message_types.items():
        entry = by_name[mt.name]
        assert name == mt.name or name in entry["aliases"]
        assert entry["audience"] == mt.audience and entry["page"] == mt.page
        assert entry["routing_keys"] == mt.keys
        assert entry["required"] == ["type", *mt.payload]
        assert entry["publishable"] is (mt.audience != "server")
    owners = {mt.name: plugin.name for plugin in registry.plugins.values() for mt in plugin.message_types}
    assert {e["type"]: e["plugin"] for e in entries} == owners


@pytest.mark.gen_test
async def test_api_types_is_public_and_describes_the_servers_registry(server, app, http_server, base_url):
    api = Api(base_url)
    status, public, response = await api.call("GET", "/api/types", key=None)
    assert status == 200 and response.headers["Content-Type"].startswith("application/json")
    assert public == await api.ok("GET", "/api/types")
    assert public == json.loads(json.dumps(catalogue(server.registry)))
    check_against_registry(public["message_types"], server.registry)
    # the test plugin's types are there: the catalogue is the server's, not a fixed list
    dashboard = next(e for e in public["message_types"] if e["type"] == "dashboard_updated")
    assert dashboard == {"type": "dashboard_updated", "plugin": "testing", "publishable": True,
                         "audience": "page", "page": "dashboard", "routing_keys": {"dashboard_id": "dashboard_id"},
                         "required": ["type", "dashboard_id"], "also_user": None, "aliases": [],
                         "side_effect": False}
    assert {p["page"] for p in public["page_types"]} == set(server.registry.page_types)
    table = next(p for p in public["page_types"] if p["page"] == "table")
    assert table["parameters"] == ["table_id"] and table["required"] == ["table_id"]
    status, body, _ = await api.call("POST", "/api/types", {"x": 1}, key=None)
    assert status == 405 and body["field"] is None


def test_builtin_catalogue_has_the_73_publishable_types():
    entries = catalogue(builtin_registry())["message_types"]
    check_against_registry(entries, builtin_registry())
    assert sum(e["publishable"] for e in entries) == 73
    assert {e["type"] for e in entries if not e["publishable"]} == {
        "authentication", "page_add", "page_discard", "force_disconnect",
        "presence", "presence_joined", "presence_left"}  # the presence extension's answers


def test_cli_types_json_and_table_load_the_plugins_serve_loads():
    result = run_cli(["types", "--json"])
    assert result.returncode == 0, result.stderr
    registry = serve_registry()
    assert json.loads(result.stdout) == json.loads(json.dumps(catalogue(registry)))
    check_against_registry(json.loads(result.stdout)["message_types"], registry)

    result = run_cli(["types"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["TYPE", "PLUGIN", "AUDIENCE", "ROUTING", "KEYS", "REQUIRED", "PAYLOAD", "KEYS"]
    listed = {line.split()[0] for line in lines[1:] if line.strip() and not line[0].isdigit()}
    assert {mt.name for mt in registry.message_types.values()} <= listed
    rows_created = next(line for line in lines if line.startswith("rows_created "))
    assert rows_created.split()[1:4] == ["database", "page", "table"]
    assert rows_created.endswith("type, table_id, rows, metadata, before_row_id")
    assert lines[-1].startswith(f"{len(set(map(id, registry.message_types.values())))} message types, ")


def test_cli_types_refuses_an_unknown_option_with_exit_code_2():
    result = run_cli(["types", "--yaml"])
    assert result.returncode == 2 and "--yaml" in result.stderr


def test_committed_docs_table_equals_the_registry():
    """Regenerate with: python -m tornado_rt.catalogue --write docs/protocol.md"""
    with open(PROTOCOL_MD, encoding="utf-8") as fh:
        text = fh.read()
    assert text.count(START_MARKER) == 1 and text.count(END_MARKER) == 1
    assert committed_block(text) == markdown(builtin_registry()), \
        "docs/protocol.md is stale: run python -m tornado_rt.catalogue --write docs/protocol.md"
    for name in builtin_registry().message_types:
        assert name in committed_block(text)  # aliases appear beside their type


def test_catalogue_write_rewrites_only_the_block(tmp_path):
    target = tmp_path / "doc.md"
    target.write_text(f"before\n{START_MARKER}\nstale\n{END_MARKER}\nafter\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "tornado_rt.catalogue", "--write", str(target)],
                            env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert target.read_text(encoding="utf-8") == (
        f"before\n{START_MARKER}\n{markdown(builtin_registry())}{END_MARKER}\nafter\n")
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "tornado_rt.catalogue", "--write", str(plain)], env=clean_env(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "no catalogue markers" in result.stderr
    assert plain.read_text(encoding="utf-8") == "no markers\n"


def test_openapi_message_is_one_schema_per_publishable_type(server, app):
    schemas = app.openapi["components"]["schemas"]
    message = schemas["Message"]
    assert message["discriminator"]["propertyName"] == "type"
    mapping = message["discriminator"]["mapping"]
    refs = [one["$ref"] for one in message["oneOf"]]
    publishable = {name: mt for name, mt in server.registry.message_types.items() if mt.audience != "server"}
    assert set(mapping) == set(publishable)
    assert len(refs) == len({id(mt) for mt in publishable.values()}) == len(set(refs))
    for name, mt in publishable.items():
        ref = mapping[name]
        assert ref in refs and ref == "#/components/schemas/" + MESSAGE_SCHEMA_PREFIX + mt.name
        schema = schemas[MESSAGE_SCHEMA_PREFIX + mt.name]
        assert schema["required"] == ["type", *mt.payload], name
        assert name in schema["properties"]["type"]["enum"]
        assert set(mt.payload) <= set(schema["properties"])
    for name, mt in server.registry.message_types.items():
        if mt.audience == "server":
            assert MESSAGE_SCHEMA_PREFIX + name not in schemas
    assert schemas[MESSAGE_SCHEMA_PREFIX + "dashboard_updated"]["required"] == ["type", "dashboard_id"]
    assert test_plugin.name == "testing"


@pytest.mark.gen_test
async def test_openapi_envelopes_use_the_per_type_message_schema(app, http_server, base_url):
    document = await Api(base_url).ok("GET", "/api/openapi.json", key=None)
    schemas = document["components"]["schemas"]
    assert schemas["MessageEnvelope"]["properties"]["message"] == {"$ref": "#/components/schemas/Message"}
    assert "Message_rows_created" in schemas


@pytest.mark.gen_test
async def test_api_docs_page_is_public_and_self_contained(app, http_server, base_url):
    status, page, response = await Api(base_url).call("GET", "/api/docs", key=None)
    assert status == 200 and response.headers["Content-Type"].startswith("text/html")
    assert "connect-src 'self'" in response.headers["Content-Security-Policy"]
    assert 'fetch("openapi.json"' in page
    # nothing is loaded from elsewhere: no external script, stylesheet, font or image
    for needle in ("src=", "<link", "@import", "http://", "https://", "innerHTML"):
        assert needle not in page, needle


@pytest.mark.gen_test(timeout=60)
async def test_api_docs_page_renders_every_operation_in_a_browser(app, http_server, base_url):
    """A real headless browser loads /api/docs, which fetches /api/openapi.json and lists every
    operation and schema of it."""
    from tornado.ioloop import IOLoop

    need("chromium", "the Debian package chromium")

    def dump():
        return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                               "--virtual-time-budget=10000", "--dump-dom", base_url + "/api/docs"],
                              capture_output=True, text=True, timeout=50, stdin=subprocess.DEVNULL)

    result = await IOLoop.current().run_in_executor(None, dump)
    dom = result.stdout
    assert '<p id="error"></p>' in dom, dom  # the fetch worked: no error text
    operations = sum(1 for item in app.openapi["paths"].values() for m in item if m in ("get", "put", "post", "delete"))
    assert dom.count('class="op"') == operations, dom[:2000]
    assert 'id="schema-Message_rows_created"' in dom
    assert "/api/publish" in dom and "API key" in dom and "no key" in dom
