"""The OpenAPI 3 document of the standalone server's HTTP API (``GET /api/openapi.json``) and
the page that shows it (``GET /api/docs``).

:func:`openapi_document` describes exactly the routes an application serves: a test compares the
document's paths and methods with the application's route table, so a route added without its
description (or the reverse) fails the build. Given the server's registry, the ``Message`` schema
is a ``oneOf`` of one schema per publishable message type, discriminated by ``type``, each with
the keys a publish of that type must carry (read from the registry, like ``GET /api/types``).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, Optional

from . import __version__
from .registry import Registry

_REF = "#/components/schemas/"


def _ref(name: str) -> Dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: Dict[str, Any]) -> Dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _ok(description: str, schema: Dict[str, Any]) -> Dict[str, Any]:
    return {"description": description, **_json(schema)}


def _error(description: str) -> Dict[str, Any]:
    return {"description": description, **_json(_ref("Error"))}


_ERRORS_NO_BODY = {
    "401": _error("Missing or wrong API key"),
    "405": _error("Method not allowed on this path"),
}
_ERRORS_BODY = {
    "400": _error("Bad JSON, or a field with a wrong value (``field`` names it)"),
    **_ERRORS_NO_BODY,
    "413": _error("The body is larger than the limit"),
    "415": _error("The body is not JSON (Content-Type must be application/json)"),
}
_DIRECTORY_503 = _error("The broker cannot take the directory change (nothing changed)")


def _body(schema: Dict[str, Any], description: str = "") -> Dict[str, Any]:
    return {"required": True, "description": description, **_json(schema)}


def _path_param(name: str, description: str) -> Dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string"}}


_WEB_SOCKET_ID_HEADER = {
    "name": "WebSocketId", "in": "header", "required": False,
    "description": "The web_socket_id of the connection that caused the change (docs/protocol.md §7); "
                   "the default of ignore_web_socket_id (publish) and ignore_web_socket_ids (disconnect).",
    "schema": {"type": "string", "format": "uuid"},
}

_HEALTH = {"type": "object", "required": ["status", "broker"], "properties": {
    "status": {"type": "string", "enum": ["ok", "degraded"]},
    "broker": {"type": "object", "properties": {"kind": {"type": "string"}, "connected": {"type": "boolean"}}},
    "directory": {"type": "object", "properties": {"saved": {"type": "boolean"},
                                                   "save_failures": {"type": "integer"}}},
}}
_ID = {"oneOf": [{"type": "integer"}, {"type": "string", "minLength": 1, "maxLength": 256}],
       "description": "An id: an integer or a non-empty string (\"7\" and 7 are the same id)."}

_SCHEMAS: Dict[str, Any] = {
    "Id": _ID,
    "Error": {
        "type": "object", "required": ["error", "field"],
        "properties": {
            "error": {"type": "string", "description": "A human sentence"},
            "field": {"type": "string", "nullable": True,
                      "description": "Dotted path of the offending value, e.g. \"[2].message.type\""},
        },
    },
    "Message": {
        "type": "object", "required": ["type"], "additionalProperties": True,
        "properties": {"type": {"type": "string", "description": "A registered message type (docs/protocol.md §6, GET /api/types)"}},
        "description": "Delivered to clients exactly as published.",
    },
    "Audience": {
        "description": "Whom to send to; absent: the message type's default audience.",
        "oneOf": [
            {"type": "object", "required": ["page"], "additionalProperties": True,
             "properties": {"page": {"type": "string"}},
             "description": "Subscribers of a page, with its parameters, e.g. {\"page\": \"table\", \"table_id\": 1}"},
            {"type": "object", "required": ["workspace_id"], "additionalProperties": False,
             "properties": {"workspace_id": _ref("Id")}},
            {"type": "object", "required": ["workspace_ids"], "additionalProperties": False,
             "properties": {"workspace_ids": {"type": "array", "items": _ref("Id")}}},
            {"type": "object", "required": ["user_ids"], "additionalProperties": False,
             "properties": {"user_ids": {"type": "array", "items": _ref("Id")}}},
            {"type": "object", "required": ["all_users"], "additionalProperties": False,
             "properties": {"all_users": {"type": "boolean", "enum": [True]}}},
        ],
    },
    "MessageEnvelope": {
        "type": "object", "required": ["message"], "additionalProperties": False,
        "properties": {
            "message": _ref("Message"),
            "to": _ref("Audience"),
            "ignore_web_socket_id": {"type": "string", "nullable": True,
                                     "description": "Skip this one connection; absent: the WebSocketId header"},
            "exclude_user_ids": {"type": "array", "items": _ref("Id"),
                                 "description": "Skip every connection of these users"},
            "id": _ref("EnvelopeId"),
        },
    },
    "IndividualEnvelope": {
        "type": "object", "required": ["individual"], "additionalProperties": False,
        "properties": {
            "individual": {"type": "object", "additionalProperties": _ref("Message"),
                           "description": "user id -> that user's own message"},
            "ignore_web_socket_id": {"type": "string", "nullable": True},
            "id": _ref("EnvelopeId"),
        },
    },
    "EnvelopeId": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,128}$",
                   "description": "Idempotency key: every process delivers an id at most once within the "
                                  "dedup window, so a retry after a 503 or a timeout never duplicates"},
    "Envelope": {"oneOf": [_ref("MessageEnvelope"), _ref("IndividualEnvelope")]},
    "Directory": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "workspaces": {"type": "object", "additionalProperties": {"type": "array", "items": _ref("Id")},
                           "description": "workspace id -> member user ids"},
            "tables": {"type": "object", "additionalProperties": _ref("Id"),
                       "description": "table id -> workspace id"},
            "public_views": {
                "type": "object", "description": "public view slug -> table and optional password token",
                "additionalProperties": {
                    "type": "object",
                    "properties": {"table_id": _ref("Id"), "token": {"type": "string", "nullable": True}},
                },
            },
        },
    },
    "DirectoryCounts": {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in ("workspaces", "tables", "public_views")},
    },
    "Ok": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
    "Catalogue": {
        "type": "object", "required": ["message_types", "page_types"],
        "properties": {
            "message_types": {"type": "array", "items": {
                "type": "object",
                "required": ["type", "plugin", "publishable", "audience", "page", "routing_keys", "required",
                             "also_user", "aliases", "side_effect"],
                "properties": {
                    "type": {"type": "string"}, "plugin": {"type": "string"},
                    "publishable": {"type": "boolean", "description": "false: generated by the server only"},
                    "audience": {"type": "string", "enum": ["explicit", "page", "workspace", "table_workspace",
                                                            "user_workspaces", "server"]},
                    "page": {"type": "string", "nullable": True},
                    "routing_keys": {"type": "object", "additionalProperties": {"type": "string"},
                                     "description": "page parameter or audience key -> dotted payload path"},
                    "required": {"type": "array", "items": {"type": "string"}},
                    "also_user": {"type": "string", "nullable": True},
                    "aliases": {"type": "array", "items": {"type": "string"}},
                    "side_effect": {"type": "boolean"},
                }}},
            "page_types": {"type": "array", "items": {
                "type": "object", "required": ["page", "plugin", "parameters", "required", "anonymous"],
                "properties": {"page": {"type": "string"}, "plugin": {"type": "string"},
                               "parameters": {"type": "array", "items": {"type": "string"}},
                               "required": {"type": "array", "items": {"type": "string"}},
                               "anonymous": {"type": "boolean"}}}},
        },
    },
    "Stats": {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in (
            "connections", "authenticated_users", "anonymous_connections", "pages", "subscriptions",
            "messages_published", "messages_delivered")},
    },
}

_OPERATIONS: Dict[str, Dict[str, Any]] = {
    "/api/publish": {"post": {
        "summary": "Publish one envelope or an array of envelopes (processed in order)",
        "description": "All envelopes are validated first: one invalid envelope rejects the whole "
                       "request with 400 naming its index (field like \"[2].message.type\") and nothing "
                       "is published. Answers once every envelope was handed to this process's connections.",
        "parameters": [_WEB_SOCKET_ID_HEADER],
        "requestBody": _body({"oneOf": [_ref("Envelope"), {"type": "array", "items": _ref("Envelope")}]}),
        "responses": {
            "200": _ok("Published", {"type": "object", "required": ["published", "delivered"], "properties": {
                "published": {"type": "integer", "description": "Envelopes published"},
                "delivered": {"type": "integer", "description": (
                    "Connections of this process handed the message(s), summed over the envelopes "
                    "(the author's connection and excluded users not counted; with the Redis broker "
                    "other processes' connections are not counted)")}}}),
            **_ERRORS_BODY,
            "503": _error("The broker cannot take the publish"),
        },
    }},
    "/api/disconnect": {"post": {
        "summary": "Force-disconnect users (force_disconnect, then close code 4003)",
        "parameters": [_WEB_SOCKET_ID_HEADER],
        "requestBody": _body({
            "type": "object", "required": ["user_ids"], "additionalProperties": False,
            "properties": {"user_ids": {"type": "array", "items": _ref("Id")},
                           "ignore_web_socket_ids": {"type": "array", "items": {"type": "string"},
                                                     "description": "Connections spared; absent: the WebSocketId header"}},
        }),
        "responses": {
            "200": _ok("Connections closed in this process",
                       {"type": "object", "properties": {"disconnected": {"type": "integer"}}}),
            **_ERRORS_BODY,
            "503": _error("The broker cannot take it"),
        },
    }},
    "/api/revoke": {"post": {
        "summary": "Drop the users' pages in a permission group (page_discard per page)",
        "requestBody": _body({
            "type": "object", "required": ["user_ids", "permission_group"], "additionalProperties": False,
            "properties": {"user_ids": {"type": "array", "items": _ref("Id")},
                           "permission_group": {"type": "string", "example": "permissions-table-7"}},
        }),
        "responses": {
            "200": _ok("Pages dropped in this process",
                       {"type": "object", "properties": {"discarded": {"type": "integer"}}}),
            **_ERRORS_BODY,
            "503": _error("The broker cannot take it"),
        },
    }},
    "/api/directory": {
        "get": {
            "summary": "The current directory snapshot",
            "responses": {"200": _ok("The directory", _ref("Directory")), **_ERRORS_NO_BODY},
        },
        "put": {
            "summary": "Replace the in-memory directory (validated first; on error nothing changes)",
            "description": "Changing the directory never drops live subscriptions: publish "
                           "group_user_deleted / table_deleted, or call /api/revoke, for that. "
                           "Every directory change travels through the broker: with the Redis "
                           "broker it changes every process, answered once this one applied it.",
            "requestBody": _body(_ref("Directory")),
            "responses": {"200": _ok("Entries loaded", _ref("DirectoryCounts")), **_ERRORS_BODY, "503": _DIRECTORY_503},
        },
    },
    "/api/directory/workspaces/{workspace_id}": {
        "parameters": [_path_param("workspace_id", "Workspace id")],
        "put": {
            "summary": "Create or replace one workspace with exactly these members",
            "requestBody": _body({"type": "object", "required": ["members"], "additionalProperties": False,
                                  "properties": {"members": {"type": "array", "items": _ref("Id")}}}),
            "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_BODY, "503": _DIRECTORY_503},
        },
        "delete": {
            "summary": "Forget a workspace, its memberships, its tables and their public views",
            "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_NO_BODY, "503": _DIRECTORY_503},
        },
    },
    "/api/directory/workspaces/{workspace_id}/members/{user_id}": {
        "parameters": [_path_param("workspace_id", "Workspace id"), _path_param("user_id", "User id")],
        "put": {"summary": "Add one member (no body)",
                "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_NO_BODY, "503": _DIRECTORY_503}},
        "delete": {"summary": "Remove one member",
                   "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_NO_BODY, "503": _DIRECTORY_503}},
    },
    "/api/directory/tables/{table_id}": {
        "parameters": [_path_param("table_id", "Table id")],
        "put": {
            "summary": "Set the workspace of a table",
            "requestBody": _body({"type": "object", "required": ["workspace_id"], "additionalProperties": False,
                                  "properties": {"workspace_id": _ref("Id")}}),
            "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_BODY, "503": _DIRECTORY_503},
        },
        "delete": {"summary": "Forget a table and its public views",
                   "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_NO_BODY, "503": _DIRECTORY_503}},
    },
    "/api/directory/public_views/{slug}": {
        "parameters": [_path_param("slug", "Public view slug")],
        "put": {
            "summary": "Create or replace a public view (token: password token or null)",
            "requestBody": _body({"type": "object", "additionalProperties": False,
                                  "properties": {"table_id": _ref("Id"),
                                                 "token": {"type": "string", "nullable": True}}}),
            "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_BODY, "503": _DIRECTORY_503},
        },
        "delete": {"summary": "Forget a public view",
                   "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_NO_BODY, "503": _DIRECTORY_503}},
    },
    "/api/stats": {"get": {
        "summary": "Connections, users, pages, subscriptions and message counts of this process",
        "responses": {"200": _ok("Numbers", _ref("Stats")), **_ERRORS_NO_BODY},
    }},
    "/api/stats/live": {"get": {
        "summary": "What the admin page shows: the stats plus subscriptions per page type, the busiest "
                   "pages, messages per second over the last minutes, refusals and closes by reason, "
                   "and the broker's state",
        "description": "Rates are sampled once a second off the hot path; `rates.published[i]` and "
                       "`rates.delivered[i]` are the messages of the second ending at `rates.times[i]`.",
        "responses": {"200": _ok("Numbers", {"type": "object"}), **_ERRORS_NO_BODY},
    }},
    "/admin": {"get": {
        "summary": "The live admin page (no key to load it: static HTML that asks for an API key, keeps it "
                   "in the tab's session storage and reads /api/stats/live with it)",
        "security": [],
        "responses": {"200": {"description": "HTML page",
                              "content": {"text/html": {"schema": {"type": "string"}}}},
                      "405": _error("Method not allowed")},
    }},
    "/api/types": {"get": {
        "summary": "The message catalogue: every registered message type and page type (no key)",
        "description": "The same JSON as `tornado-rt types --json`, for this server's plugins.",
        "security": [],
        "responses": {"200": _ok("The catalogue", _ref("Catalogue")), "405": _error("Method not allowed")},
    }},
    "/api/openapi.json": {"get": {
        "summary": "This document (no key; the operations it describes still need one)",
        "security": [],
        "responses": {"200": _ok("OpenAPI 3 document", {"type": "object"}), "405": _error("Method not allowed")},
    }},
    "/api/docs": {"get": {
        "summary": "A human-readable page rendering this document (no key, no external resources)",
        "security": [],
        "responses": {"200": {"description": "HTML page",
                              "content": {"text/html": {"schema": {"type": "string"}}}},
                      "405": _error("Method not allowed")},
    }},
    "/healthz": {"get": {
        "summary": "Health (no key): 503 while the broker is unreachable", "security": [],
        "responses": {"200": _ok("Healthy", _HEALTH), "503": _ok("Degraded: the broker is unreachable", _HEALTH),
                      "405": _error("Method not allowed")},
    }},
    "/client/tornado-rt.js": {"get": {
        "summary": "The browser / Node client, an ES module (no key; any origin may load it)", "security": [],
        "responses": {"200": {"description": "JavaScript",
                              "content": {"text/javascript": {"schema": {"type": "string"}}}},
                      "405": _error("Method not allowed")},
    }},
    "/metrics": {"get": {
        "summary": "Prometheus text exposition (no key)", "security": [],
        "responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                      "405": _error("Method not allowed")},
    }},
}


def _websocket_operation(path: str) -> Dict[str, Any]:
    return {"get": {
        "summary": "The WebSocket endpoint (Baserow's real-time protocol, docs/protocol.md)",
        "description": "Upgrade to WebSocket with ?jwt_token=<JWT or 'anonymous'>. The first message is "
                       "{\"type\": \"authentication\", ...}; then send {\"page\": NAME, ...params} to subscribe. "
                       "An Origin outside the allow-list gets 403; the connection limit gives 503.",
        "security": [],
        "parameters": [{"name": "jwt_token", "in": "query", "required": True, "schema": {"type": "string"}}],
        "responses": {"101": {"description": "Switching Protocols"},
                      "403": {"description": "Origin not allowed"},
                      "503": _error("Connection limit reached")},
    }}


MESSAGE_SCHEMA_PREFIX = "Message_"


def message_schemas(registry: Registry) -> Dict[str, Any]:
    """One schema per publishable message type (``Message_<type>``) and the ``Message`` schema:
    their ``oneOf``, discriminated by ``type`` (aliases map to their type's schema)."""
    from .catalogue import AUDIENCE_TEXT, message_types

    schemas: Dict[str, Any] = {}
    mapping: Dict[str, str] = {}
    for entry in message_types(registry):
        if not entry["publishable"]:
            continue
        name = MESSAGE_SCHEMA_PREFIX + entry["type"]
        names = [entry["type"], *entry["aliases"]]
        properties: Dict[str, Any] = {"type": {"type": "string", "enum": names}}
        for key in entry["required"][1:]:
            properties[key] = {}
        routing = ", ".join(f"{param} from {path}" for param, path in entry["routing_keys"].items())
        audience = AUDIENCE_TEXT[entry["audience"]].replace("a page", f"page {entry['page']}")
        text = f"Plugin {entry['plugin']}. Default audience: {audience}"
        if routing:
            text += f" ({routing}; needed only without an explicit `to`)"
        schemas[name] = {"type": "object", "required": list(entry["required"]), "additionalProperties": True,
                         "properties": properties, "description": text + "."}
        for alias in names:
            mapping[alias] = _REF + name
    schemas["Message"] = {
        "description": "A message of a registered, publishable type, delivered to clients exactly as "
                       "published; the keys listed as required must be present (GET /api/types).",
        "oneOf": [{"$ref": _REF + n} for n in schemas],
        "discriminator": {"propertyName": "type", "mapping": mapping},
    }
    return schemas


def openapi_document(paths: Iterable[str], websocket_path: str = "/ws/core/",
                     max_body_size: int = 10 * 1024 * 1024,
                     registry: Optional[Registry] = None) -> Dict[str, Any]:
    """The OpenAPI 3.0 document for the HTTP ``paths`` served (templates like
    ``/api/directory/tables/{table_id}``) plus the WebSocket endpoint at ``websocket_path``.
    With ``registry``, ``Message`` lists every publishable type (:func:`message_schemas`)."""
    doc_paths: Dict[str, Any] = {}
    for path in paths:
        doc_paths[path] = copy.deepcopy(_OPERATIONS[path])
    doc_paths[websocket_path] = _websocket_operation(websocket_path)
    schemas = copy.deepcopy(_SCHEMAS)
    if registry is not None:
        schemas.update(message_schemas(registry))
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "tornado-rt server API",
            "version": __version__,
            "description": "HTTP server API of the standalone tornado-rt server (docs/server-api.md). "
                           "Endpoints under /api/ need 'Authorization: Bearer <api key>', except "
                           "the descriptions: /api/types, /api/openapi.json and /api/docs. Errors are "
                           "{\"error\": sentence, \"field\": dotted path or null}. Request bodies are "
                           f"limited to {max_body_size} bytes (413).",
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}],
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                           "description": "One of the server's API keys"}},
            "schemas": schemas,
        },
        "paths": doc_paths,
    }


#: ``GET /api/docs``: renders /api/openapi.json with plain JavaScript. Self-contained (no CDN, no
#: external resource), and every text from the document is inserted as text, never as HTML.
DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tornado-rt server API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
code, .path { font-family: ui-monospace, monospace; }
.op { border: 1px solid #ddd; border-radius: 4px; margin: 0.6em 0; padding: 0.5em 0.8em; }
.method { display: inline-block; min-width: 4.5em; font-weight: bold; text-transform: uppercase; }
.open { color: #075; font-size: 0.85em; margin-left: 0.8em; } .key { color: #a40; font-size: 0.85em; margin-left: 0.8em; }
.schema { margin: 0.4em 0 1em 0; } .muted { color: #666; } ul { margin: 0.2em 0; }
#error { color: #b00; }
</style>
</head>
<body>
<h1 id="title">tornado-rt server API</h1>
<p id="description" class="muted">Loading <code>openapi.json</code> ...</p>
<p id="error"></p>
<h2>Operations</h2>
<div id="operations"></div>
<h2>Schemas</h2>
<div id="schemas"></div>
<script>
"use strict";
function el(tag, text, cls) {
  var node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function refName(ref) { return ref.split("/").pop(); }
function describe(schema) {
  if (!schema) return "";
  if (schema.$ref) return refName(schema.$ref);
  if (schema.oneOf) return "one of: " + schema.oneOf.map(describe).join(" | ");
  if (schema.type === "array") return "array of " + describe(schema.items || {});
  if (schema.enum) return schema.enum.map(function (v) { return JSON.stringify(v); }).join(" | ");
  return schema.type || "any";
}
function render(doc) {
  document.getElementById("title").textContent = doc.info.title + " " + doc.info.version;
  document.getElementById("description").textContent = doc.info.description || "";
  var ops = document.getElementById("operations");
  var globalSecurity = doc.security || [];
  Object.keys(doc.paths).forEach(function (path) {
    var item = doc.paths[path];
    ["get", "put", "post", "delete", "patch"].forEach(function (method) {
      var op = item[method];
      if (!op) return;
      var box = el("div", null, "op");
      var head = el("div");
      head.appendChild(el("span", method, "method"));
      head.appendChild(el("span", path, "path"));
      var open = (op.security || globalSecurity).length === 0;
      head.appendChild(el("span", open ? "no key" : "API key", open ? "open" : "key"));
      box.appendChild(head);
      box.appendChild(el("div", op.summary));
      if (op.description) box.appendChild(el("div", op.description, "muted"));
      if (op.requestBody) {
        var body = op.requestBody.content["application/json"];
        box.appendChild(el("div", "Body: " + describe(body && body.schema), "muted"));
      }
      var codes = Object.keys(op.responses).map(function (code) {
        return code + " " + op.responses[code].description;
      });
      box.appendChild(el("div", "Answers: " + codes.join("; "), "muted"));
      ops.appendChild(box);
    });
  });
  var schemas = document.getElementById("schemas");
  var all = (doc.components && doc.components.schemas) || {};
  Object.keys(all).sort().forEach(function (name) {
    var schema = all[name];
    var box = el("div", null, "schema");
    box.id = "schema-" + name;
    box.appendChild(el("h3", name));
    if (schema.description) box.appendChild(el("div", schema.description, "muted"));
    if (schema.oneOf) box.appendChild(el("div", describe(schema)));
    var props = schema.properties || {};
    var required = schema.required || [];
    var keys = Object.keys(props);
    if (keys.length) {
      var list = el("ul");
      keys.forEach(function (key) {
        var mark = required.indexOf(key) >= 0 ? " (required)" : "";
        list.appendChild(el("li", key + ": " + describe(props[key]) + mark));
      });
      box.appendChild(list);
    }
    schemas.appendChild(box);
  });
}
fetch("openapi.json", {headers: {"Accept": "application/json"}})
  .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
  .then(render)
  .catch(function (e) { document.getElementById("error").textContent = "Cannot load openapi.json: " + e.message; });
</script>
</body>
</html>
"""
