"""The OpenAPI 3 document of the standalone server's HTTP API (``GET /api/openapi.json``).

:func:`openapi_document` describes exactly the routes an application serves: a test compares the
document's paths and methods with the application's route table, so a route added without its
description (or the reverse) fails the build.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable

from . import __version__

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


def _body(schema: Dict[str, Any], description: str = "") -> Dict[str, Any]:
    return {"required": True, "description": description, **_json(schema)}


def _path_param(name: str, description: str) -> Dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string"}}


_WEB_SOCKET_ID_HEADER = {
    "name": "WebSocketId", "in": "header", "required": False,
    "description": "The web_socket_id of the connection that caused the change (PROTOCOL.md §7); "
                   "the default of ignore_web_socket_id (publish) and ignore_web_socket_ids (disconnect).",
    "schema": {"type": "string", "format": "uuid"},
}

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
        "properties": {"type": {"type": "string", "description": "A registered message type (PROTOCOL.md §6)"}},
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
        },
    },
    "IndividualEnvelope": {
        "type": "object", "required": ["individual"], "additionalProperties": False,
        "properties": {
            "individual": {"type": "object", "additionalProperties": _ref("Message"),
                           "description": "user id -> that user's own message"},
            "ignore_web_socket_id": {"type": "string", "nullable": True},
        },
    },
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
            "200": _ok("Published", {"type": "object", "properties": {"published": {"type": "integer"}}}),
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
                           "group_user_deleted / table_deleted, or call /api/revoke, for that.",
            "requestBody": _body(_ref("Directory")),
            "responses": {"200": _ok("Entries loaded", _ref("DirectoryCounts")), **_ERRORS_BODY},
        },
    },
    "/api/directory/workspaces/{workspace_id}": {
        "parameters": [_path_param("workspace_id", "Workspace id")],
        "put": {
            "summary": "Create or replace one workspace with exactly these members",
            "requestBody": _body({"type": "object", "required": ["members"], "additionalProperties": False,
                                  "properties": {"members": {"type": "array", "items": _ref("Id")}}}),
            "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_BODY},
        },
        "delete": {
            "summary": "Forget a workspace, its memberships, its tables and their public views",
            "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_NO_BODY},
        },
    },
    "/api/directory/workspaces/{workspace_id}/members/{user_id}": {
        "parameters": [_path_param("workspace_id", "Workspace id"), _path_param("user_id", "User id")],
        "put": {"summary": "Add one member (no body)",
                "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_NO_BODY}},
        "delete": {"summary": "Remove one member",
                   "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_NO_BODY}},
    },
    "/api/directory/tables/{table_id}": {
        "parameters": [_path_param("table_id", "Table id")],
        "put": {
            "summary": "Set the workspace of a table",
            "requestBody": _body({"type": "object", "required": ["workspace_id"], "additionalProperties": False,
                                  "properties": {"workspace_id": _ref("Id")}}),
            "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_BODY},
        },
        "delete": {"summary": "Forget a table and its public views",
                   "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_NO_BODY}},
    },
    "/api/directory/public_views/{slug}": {
        "parameters": [_path_param("slug", "Public view slug")],
        "put": {
            "summary": "Create or replace a public view (token: password token or null)",
            "requestBody": _body({"type": "object", "additionalProperties": False,
                                  "properties": {"table_id": _ref("Id"),
                                                 "token": {"type": "string", "nullable": True}}}),
            "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_BODY},
        },
        "delete": {"summary": "Forget a public view",
                   "responses": {"200": _ok("Done", _ref("Ok")), **_ERRORS_NO_BODY}},
    },
    "/api/stats": {"get": {
        "summary": "Connections, users, pages, subscriptions and message counts of this process",
        "responses": {"200": _ok("Numbers", _ref("Stats")), **_ERRORS_NO_BODY},
    }},
    "/api/openapi.json": {"get": {
        "summary": "This document",
        "responses": {"200": _ok("OpenAPI 3 document", {"type": "object"}), **_ERRORS_NO_BODY},
    }},
    "/healthz": {"get": {
        "summary": "Liveness (no key)", "security": [],
        "responses": {"200": _ok("Alive", {"type": "object", "properties": {"status": {"type": "string", "enum": ["ok"]}}}),
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
        "summary": "The WebSocket endpoint (Baserow's real-time protocol, PROTOCOL.md)",
        "description": "Upgrade to WebSocket with ?jwt_token=<JWT or 'anonymous'>. The first message is "
                       "{\"type\": \"authentication\", ...}; then send {\"page\": NAME, ...params} to subscribe. "
                       "An Origin outside the allow-list gets 403; the connection limit gives 503.",
        "security": [],
        "parameters": [{"name": "jwt_token", "in": "query", "required": True, "schema": {"type": "string"}}],
        "responses": {"101": {"description": "Switching Protocols"},
                      "403": {"description": "Origin not allowed"},
                      "503": _error("Connection limit reached")},
    }}


def openapi_document(paths: Iterable[str], websocket_path: str = "/ws/core/",
                     max_body_size: int = 10 * 1024 * 1024) -> Dict[str, Any]:
    """The OpenAPI 3.0 document for the HTTP ``paths`` served (templates like
    ``/api/directory/tables/{table_id}``) plus the WebSocket endpoint at ``websocket_path``."""
    doc_paths: Dict[str, Any] = {}
    for path in paths:
        doc_paths[path] = copy.deepcopy(_OPERATIONS[path])
    doc_paths[websocket_path] = _websocket_operation(websocket_path)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "tornado-rt server API",
            "version": __version__,
            "description": "HTTP server API of the standalone tornado-rt server (SERVER_API.md). "
                           "Endpoints under /api/ need 'Authorization: Bearer <api key>'. Errors are "
                           "{\"error\": sentence, \"field\": dotted path or null}. Request bodies are "
                           f"limited to {max_body_size} bytes (413).",
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}],
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                           "description": "One of the server's API keys"}},
            "schemas": copy.deepcopy(_SCHEMAS),
        },
        "paths": doc_paths,
    }
