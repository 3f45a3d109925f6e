"""The REST API's route table (DESIGN §8): one module per resource, gathered
here for the router and for /openapi.json. Permissions are in each module's
docstring and in docs/api.md."""

from __future__ import annotations

from aiohttp import web

from jarvisd.http import (
    agents,
    cache_api,
    commands,
    events,
    login,
    pubsub,
    sessions,
    users,
    webhooks,
)
from jarvisd.http.common import RouteDoc

__all__ = ["ROUTES", "add_routes"]

ROUTES: list[RouteDoc] = [
    *login.ROUTES,
    *users.ROUTES,
    *agents.ROUTES,
    *commands.ROUTES,
    *events.ROUTES,
    *webhooks.ROUTES,
    *cache_api.ROUTES,
    *sessions.ROUTES,
    *pubsub.ROUTES,
]


# Literal paths under /cache that the {key} route must not also match.
_CACHE_WORDS = ("set", "get", "exists", "invalidate", "stats")
_CACHE_KEY = "{key:(?!(?:" + "|".join(_CACHE_WORDS) + ")$)[^/]+}"


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        path = route.path
        if path == "/cache/{key}":
            path = "/cache/" + _CACHE_KEY
        app.router.add_route(route.method, path, route.handler)
    app.router.add_get("/ws", pubsub.websocket)
