"""``GET /openapi.json``: generated from the route table, the list specs and
the msgspec types the handlers decode and encode, so the document cannot
drift from the code. Every constraint the handlers enforce on a single value
is in the schema (so a request the schema allows is one the API accepts)."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from aiohttp import web

from actors.data.listing import (
    MAX_LIMIT,
    MAX_OFFSET_PARAM,
    MAX_PAGE,
    MAX_TEXT,
    Filter,
    ListSpec,
)
from actors.data.model import JSON_VALUE_REF
from jarvisd import __version__
from jarvisd.http.api import ROUTES
from jarvisd.http.common import MAX_ID, RouteDoc
from jarvisd.http.errors import reject_unknown_params
from jarvisd.http.health import HEALTH_ROUTES

__all__ = ["add_routes", "document"]

_PARAM = re.compile(r"{(\w+)}")
# Statuses any route may answer: bad input, no or wrong credentials, not
# found, a conflicting state, a body over the limit, a dependency down.
COMMON_STATUSES = (400, 401, 403, 404, 409, 413, 503)
BODY_STATUSES = (408, 415)
PROBLEM = {
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
    "required": ["title", "status"],
}
NO_NUL = "^[^\\u0000]*$"
# Any JSON without NUL (what PostgreSQL's jsonb stores), for JsonObject/JsonValue.
JSON_VALUE = {
    "anyOf": [
        {"type": "string", "pattern": NO_NUL},
        {"type": ["number", "boolean", "null"]},
        {"type": "array", "items": {"$ref": JSON_VALUE_REF}},
        {
            "type": "object",
            "propertyNames": {"pattern": NO_NUL},
            "additionalProperties": {"$ref": JSON_VALUE_REF},
        },
    ]
}
CACHE_WORDS = "set|get|exists|invalidate|stats"
# Path parameters that are strings, by route: cache keys and session ids.
_TEXT_PARAMS = {
    "/cache/{key}": {
        "type": "string",
        "minLength": 1,
        "maxLength": 1024,
        "pattern": f"^(?!(?:{CACHE_WORDS})$)[^/]+$",
    },
    "/cache/": {"type": "string", "minLength": 1, "maxLength": 1024, "pattern": "^[^/]+$"},
    "/sessions/": {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,128}$"},
    "/agents/{name}": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"},
}
# OpenAPI links: where an id a POST returns is used next (for clients and
# for stateful testing).
_LINKS: dict[tuple[str, str], dict[str, tuple[str, str, str]]] = {
    ("POST", "/users"): {
        "GetUser": ("get_user", "id", "$response.body#/id"),
        "UpdateUser": ("update_user", "id", "$response.body#/id"),
        "CreateToken": ("create_token", "id", "$response.body#/id"),
        "ListSessions": ("list_user_sessions", "id", "$response.body#/id"),
    },
    ("POST", "/users/{id}/tokens"): {
        "ListTokens": ("list_tokens", "id", "$response.body#/info/userId"),
    },
    ("POST", "/commands"): {
        "GetCommand": ("get_command", "id", "$response.body#/id"),
        "ReportCommand": ("update_command", "id", "$response.body#/id"),
        "GetCommandApproval": ("get_approval", "id", "$response.body#/approvalId"),
        "ApproveCommand": ("approved_approval", "id", "$response.body#/approvalId"),
    },
    ("POST", "/approvals"): {
        "GetApproval": ("get_approval", "id", "$response.body#/id"),
        "Approve": ("approved_approval", "id", "$response.body#/id"),
        "Reject": ("rejected_approval", "id", "$response.body#/id"),
        "Cancel": ("cancelled_approval", "id", "$response.body#/id"),
    },
    ("POST", "/sessions"): {
        "GetSession": ("session_get", "id", "$response.body#/id"),
        "UpdateSession": ("session_update", "id", "$response.body#/id"),
        "DeleteSession": ("session_delete", "id", "$response.body#/id"),
    },
}


def _filter_schema(flt: Filter) -> dict[str, Any]:
    if flt.kind == "in":
        assert flt.choices is not None
        one = "|".join(re.escape(c) for c in sorted(flt.choices))
        return {
            "type": "string",
            "pattern": f"^({one})(,({one})){{0,49}}$",
            "description": "one value or a comma-separated list",
        }
    if flt.type is int:
        lo, hi = flt.bounds or (-(2**63), 2**63 - 1)
        return {"type": "integer", "minimum": lo, "maximum": hi}
    if flt.type is bool:
        return {"type": "string", "enum": ["true", "false"]}
    if flt.type.__name__ == "datetime":
        return {"type": "string", "format": "date-time"}
    return {"type": "string", "maxLength": MAX_TEXT, "pattern": NO_NUL}


def _list_params(spec: ListSpec) -> list[dict[str, Any]]:
    orders = sorted(spec.orders)
    common: dict[str, dict[str, Any]] = {
        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50},
        "cursor": {
            "type": "string",
            "pattern": "^[A-Za-z0-9_-]*$",
            "description": "opaque: the nextCursor of the previous page",
        },
        "offset": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET_PARAM},
        "page": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
        "order": {
            "type": "string",
            "enum": [*orders, *(f"-{o}" for o in orders)],
            "default": spec.default_order,
        },
    }
    params = [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in common.items()
    ]
    params += [
        {"name": name, "in": "query", "required": False, "schema": _filter_schema(flt)}
        for name, flt in sorted(spec.filters.items())
    ]
    params.append(
        {
            "name": "Prefer",
            "in": "header",
            "required": False,
            "description": "count=exact or count=estimated adds a count",
            "schema": {"type": "string"},
        }
    )
    return params


def _path_params(route: RouteDoc) -> list[dict[str, Any]]:
    text = _TEXT_PARAMS.get(route.path) or next(
        (s for p, s in _TEXT_PARAMS.items() if p.endswith("/") and route.path.startswith(p)),
        None,
    )
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": text or {"type": "integer", "minimum": 1, "maximum": MAX_ID},
        }
        for name in _PARAM.findall(route.path)
    ]


def _problem_response() -> dict[str, Any]:
    return {
        "description": "Problem",
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }


def _operation(route: RouteDoc, schema_of: dict[Any, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": route.handler.__name__,
        "security": [] if route.path == "/auth/login" else [{"bearer": []}],
    }
    params = _path_params(route)
    if route.list_spec is not None:
        params += _list_params(route.list_spec)
    params += [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": text}
        for name, schema, text in route.query
    ]
    if params:
        op["parameters"] = params
    statuses = [*COMMON_STATUSES, *route.statuses]
    if route.body is not None:
        op["requestBody"] = {
            "required": route.body_required,
            "content": {"application/json": {"schema": schema_of[route.body]}},
        }
        statuses += BODY_STATUSES
    ok: dict[str, Any] = {"description": "OK"}
    if route.response is not None:
        ok["content"] = {"application/json": {"schema": schema_of[route.response]}}
    if route.raw_content is not None:
        ok.setdefault("content", {})[route.raw_content] = {}
    links = _LINKS.get((route.method, route.path))
    if links:
        ok["links"] = {
            name: {"operationId": op_id, "parameters": {param: source}}
            for name, (op_id, param, source) in links.items()
        }
    responses: dict[str, Any] = {str(route.status): ok}
    for status in sorted(set(statuses)):
        responses[str(status)] = _problem_response()
    if route.method == "POST" and route.path == "/commands":
        responses["200"] = {
            "description": "The command with this requestId already exists",
            "content": ok["content"],
        }
    op["responses"] = responses
    return op


def document() -> dict[str, Any]:
    types = sorted({t for r in ROUTES for t in (r.body, r.response) if t is not None}, key=repr)
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    schema_of = dict(zip(types, schemas, strict=True))
    components["Problem"] = PROBLEM
    components["JsonValue"] = JSON_VALUE
    paths: dict[str, dict[str, Any]] = {}
    for path, summary, query, content_types in HEALTH_ROUTES:
        ok = {"description": "OK", "content": {ct: {} for ct in content_types}}
        paths[path] = {
            "get": {
                "summary": summary,
                "operationId": path.strip("/").replace("/", "_") or "index",
                "parameters": [
                    {"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
                    for q in query
                ],
                "responses": {
                    "200": ok,
                    "400": _problem_response(),
                    "401": _problem_response(),
                    "503": {"description": "Not ready", "content": ok["content"]},
                },
            }
        }
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schema_of)
    paths["/ws"] = {
        "get": {
            "summary": "WebSocket: subscribe to channels and patterns (ops in docs/agents.md)",
            "operationId": "websocket",
            "security": [{"bearer": []}],
            "responses": {
                "101": {"description": "Switching to the WebSocket protocol"},
                "400": _problem_response(),
                "401": _problem_response(),
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jarvisd",
            "version": __version__,
            "description": "The local API of jarvisd, the Jarvis state daemon.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API token (jv_...) or a login session token",
                }
            },
        },
    }


_CACHED: bytes | None = None


async def openapi(request: web.Request) -> web.Response:
    global _CACHED
    reject_unknown_params(request, ())
    if _CACHED is None:
        _CACHED = msgspec.json.encode(document())
    return web.Response(body=_CACHED, content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi)
