"""``GET /api/openapi.json``: an OpenAPI 3 document that lists exactly the routes the application
serves (compared with Tornado's route table), with working references, and whose security
claims match the server's behaviour; it is public, and ``GET /api/docs`` renders it."""
import json
import re

import pytest
from tornado.web import RequestHandler

from standalone import API_KEY, SECRET, Api
from tornado_rt import RealtimeServer, Settings
from tornado_rt.httpapi import make_app

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def new_server():
    return RealtimeServer(Settings(jwt_secret=SECRET, ping_interval=0), load_entry_points=False)


@pytest.fixture
def app():
    return make_app(new_server(), [API_KEY])


def served_methods(handler):
    """HTTP methods a handler class really implements (overrides RequestHandler's 405 stubs)."""
    return {m for m in HTTP_METHODS if getattr(handler, m) is not getattr(RequestHandler, m)}


def route_table(app):
    return [(rule.matcher.regex, rule.target) for rule in app.wildcard_router.rules]


def instantiate(template):
    return re.sub(r"\{[^}]+\}", "sample-1", template)


def documented(document):
    return {path: {m for m in item if m in HTTP_METHODS} for path, item in document["paths"].items()}


@pytest.mark.gen_test
async def test_served_document_parses_and_is_openapi_3(app, http_server, base_url):
    status, document, response = await Api(base_url).call("GET", "/api/openapi.json")
    assert status == 200 and response.headers["Content-Type"].startswith("application/json")
    assert isinstance(document, dict)
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"] and document["info"]["version"]
    assert document == json.loads(json.dumps(app.openapi))
    # public since issue 11: the same document without a key, while the operations keep theirs
    status, public, _ = await Api(base_url).call("GET", "/api/openapi.json", key=None)
    assert status == 200 and public == document
    status, _, _ = await Api(base_url).call("GET", "/api/stats", key=None)
    assert status == 401


@pytest.mark.parametrize("metrics", [True, False])
def test_paths_equal_the_application_route_table(metrics):
    app = make_app(new_server(), [API_KEY], metrics=metrics)
    document = app.openapi
    routes = route_table(app)
    docs = documented(document)
    assert ("/metrics" in docs) is metrics

    # every documented path is served by exactly one route, with exactly the documented methods
    for template, methods in docs.items():
        concrete = instantiate(template)
        matching = [(regex, handler) for regex, handler in routes if regex.fullmatch(concrete)]
        assert len(matching) == 1, f"{template}: served by {len(matching)} routes"
        assert served_methods(matching[0][1]) == methods, template

    # every route is documented
    concretes = [instantiate(t) for t in docs]
    for regex, handler in routes:
        assert any(regex.fullmatch(c) for c in concretes), f"route {regex.pattern} ({handler.__name__}) undocumented"
    assert len(routes) == len(docs)


def test_path_parameters_are_declared(app):
    for template, item in app.openapi["paths"].items():
        names = set(re.findall(r"\{([^}]+)\}", template))
        for method in (m for m in item if m in HTTP_METHODS):
            declared = {p["name"] for p in item.get("parameters", []) + item[method].get("parameters", [])
                        if p["in"] == "path"}
            assert declared == names, (template, method)


def test_every_reference_resolves_and_every_operation_has_responses(app):
    document = app.openapi

    def walk(node):
        if isinstance(node, dict):
            for key, child in node.items():
                if key == "$ref":
                    assert child.startswith("#/"), child
                    target = document
                    for part in child[2:].split("/"):
                        assert part in target, f"unresolved {child}"
                        target = target[part]
                else:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(document)
    for template, item in document["paths"].items():
        for method in (m for m in item if m in HTTP_METHODS):
            operation = item[method]
            assert operation["summary"], (template, method)
            assert any(code.startswith("2") or code == "101" for code in operation["responses"]), (template, method)
            if "requestBody" in operation:
                for code in ("400", "413", "415"):
                    assert code in operation["responses"], (template, method, code)


@pytest.mark.gen_test
async def test_documented_security_matches_the_server(app, http_server, base_url):
    """Operations documented as open answer without a key; all others answer 401 without one."""
    api = Api(base_url)
    document = app.openapi
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    for template, item in document["paths"].items():
        if template.startswith("/ws/"):
            continue  # the WebSocket endpoint is exercised by its own tests
        for method in (m for m in item if m in HTTP_METHODS):
            open_endpoint = item[method].get("security", document["security"]) == []
            status, _, _ = await api.call(method.upper(), instantiate(template), key=None)
            assert (status != 401) is open_endpoint, (template, method, status)
