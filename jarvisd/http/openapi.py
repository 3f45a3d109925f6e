"""``GET /openapi.json``: generated from the route table and the msgspec types
the handlers decode and encode, so the document cannot drift from the code."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from aiohttp import web

from jarvisd import __version__
from jarvisd.http import cache_api
from jarvisd.http.api import ROUTES as API_ROUTES
from jarvisd.http.api import RouteDoc
from jarvisd.http.errors import reject_unknown_params

_PARAM = re.compile(r"{(\w+)}")
ROUTES = [*API_ROUTES, *cache_api.ROUTES]
_HEALTH = [
    ("/health/live", "Liveness: the process answers"),
    (
        "/health/ready",
        "Readiness (application/health+json; 503 when failing or draining; ?verbose for text)",
    ),
    ("/health", "The readiness document"),
    ("/stats", "Daemon statistics (JSON)"),
    ("/metrics", "Prometheus text exposition 0.0.4"),
    ("/redis/health", "Redis reachability"),
    ("/redis/stats", "Redis server facts and cache statistics"),
]
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


def _operation(route: RouteDoc, schema_of: dict[Any, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": route.handler.__name__,
        "security": [{"bearer": []}],
    }
    if route.path.startswith("/auth/login"):
        op["security"] = []
    textual = route.path.startswith(("/cache", "/sessions"))  # keys and session ids are strings
    params = [
        {
            "name": p,
            "in": "path",
            "required": True,
            "schema": {"type": "string" if textual else "integer"},
        }
        for p in _PARAM.findall(route.path)
    ]
    if route.list_spec is not None:
        for name in sorted(route.list_spec.params):
            params.append(
                {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
            )
        params.append(
            {
                "name": "Prefer",
                "in": "header",
                "required": False,
                "description": "count=exact or count=estimated adds a count",
                "schema": {"type": "string"},
            }
        )
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": route.method != "PUT"
            or not route.path.endswith(("/approve", "/reject", "/cancel")),
            "content": {"application/json": {"schema": schema_of[route.body]}},
        }
    ok: dict[str, Any] = {"description": "OK"}
    if route.response is not None:
        ok["content"] = {"application/json": {"schema": schema_of[route.response]}}
    problem = {
        "description": "Problem",
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }
    op["responses"] = {
        str(route.status): ok,
        "400": problem,
        "401": problem,
        "403": problem,
        "404": problem,
        "409": problem,
        "413": problem,
        "503": problem,
    }
    return op


def document() -> dict[str, Any]:
    types = sorted({t for r in ROUTES for t in (r.body, r.response) if t is not None}, key=repr)
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    schema_of = dict(zip(types, schemas, strict=True))
    components["Problem"] = PROBLEM
    paths: dict[str, dict[str, Any]] = {}
    for path, summary in _HEALTH:
        paths[path] = {
            "get": {
                "summary": summary,
                "operationId": path.strip("/").replace("/", "_"),
                "responses": {"200": {"description": "OK"}, "503": {"description": "Not ready"}},
            }
        }
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schema_of)
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
                    "description": "an API token (jv_...) or a session token",
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
