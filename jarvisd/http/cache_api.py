"""HTTP routes of the cache and sessions actors (DESIGN §8).

Cache: admins and agents (the services that cache); stats also approvers.
Sessions (the store other services use for their users): admins and agents
for any session; other users only for their own.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web

from actors.cache import (
    MAX_KEY_BYTES,
    CacheDelete,
    CacheError,
    CacheExists,
    CacheFlush,
    CacheGet,
    CacheInvalidatePattern,
    CacheInvalidateTags,
    CacheSet,
    CacheStatsQuery,
    Mode,
)
from actors.data.model import Principal
from actors.sessions import Session, SessionCreate, SessionDelete, SessionGet, SessionUpdate
from jarvisd.http.api import RouteDoc, ask, body, reply
from jarvisd.http.auth import forbidden, require
from jarvisd.http.errors import ProblemError, reject_unknown_params

DEFAULT_NS = "default"
CacheKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_BYTES)]


class CacheSetBody(
    msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True
):
    key: CacheKey
    value: Any
    namespace: str = DEFAULT_NS
    ttl: Annotated[float, msgspec.Meta(gt=0)] | None = None  # seconds
    ttl_ms: Annotated[int, msgspec.Meta(gt=0)] | None = None
    nx: bool = False
    xx: bool = False
    keepttl: bool = False
    tags: list[CacheKey] = msgspec.field(default_factory=list)


class CacheInvalidateBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    namespace: str = DEFAULT_NS
    tags: list[CacheKey] | None = None
    pattern: CacheKey | None = None


class SessionCreateBody(
    msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True
):
    user_id: int
    data: Any = None
    idle_ttl: Annotated[int, msgspec.Meta(gt=0)] | None = None
    absolute_ttl: Annotated[int, msgspec.Meta(gt=0)] | None = None


class SessionUpdateBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    data: Any
    version: int | None = None


def _namespace(request: web.Request) -> str:
    return request.query.get("namespace", DEFAULT_NS)


def _cache_error(exc: CacheError) -> ProblemError:
    status = 413 if "over the limit" in str(exc) else 400
    return ProblemError(status, "Payload too large" if status == 413 else "Bad request", str(exc))


async def _cache(request: web.Request, msg: Any) -> Any:
    try:
        return await ask(request, "cache", msg)
    except CacheError as exc:
        raise _cache_error(exc) from None


# -- cache ---------------------------------------------------------------------------------------------------
@require("admin", "agent")
async def cache_set(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    b = await body(request, CacheSetBody)
    if b.nx and b.xx:
        raise ProblemError(400, "Bad request", "nx and xx exclude each other")
    if b.ttl is not None and b.ttl_ms is not None:
        raise ProblemError(400, "Bad request", "give ttl or ttlMs, not both")
    ttl_ms = b.ttl_ms if b.ttl is None else max(1, round(b.ttl * 1000))
    mode: Mode = "NX" if b.nx else "XX" if b.xx else ""
    stored = await _cache(
        request,
        CacheSet(
            b.namespace,
            b.key,
            b.value,
            ttl_ms=ttl_ms,
            mode=mode,
            keepttl=b.keepttl,
            tags=tuple(b.tags),
        ),
    )
    return reply({"stored": stored, "key": b.key, "namespace": b.namespace})


@require("admin", "agent")
async def cache_get(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("namespace", "raw"))
    key = request.match_info["key"]
    raw = "raw" in request.query
    hit, value = await _cache(request, CacheGet(_namespace(request), key, raw=raw))
    if not hit:
        raise ProblemError(404, "Not found", f"no cached value for {key!r}")
    if raw:
        return web.Response(body=value, content_type="application/octet-stream")
    return reply({"key": key, "value": value, "hit": True})


@require("admin", "agent")
async def cache_delete(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("namespace",))
    deleted = await _cache(request, CacheDelete(_namespace(request), (request.match_info["key"],)))
    return reply({"deleted": deleted})


@require("admin", "agent")
async def cache_exists(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("namespace",))
    found = await _cache(request, CacheExists(_namespace(request), (request.match_info["key"],)))
    return reply({"exists": bool(found)})


@require("admin", "agent")
async def cache_invalidate(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    b = await body(request, CacheInvalidateBody)
    if (b.tags is None) == (b.pattern is None):
        raise ProblemError(400, "Bad request", "give either tags or pattern")
    if b.tags is not None:
        removed = await _cache(request, CacheInvalidateTags(b.namespace, tuple(b.tags)))
    else:
        assert b.pattern is not None
        removed = await _cache(request, CacheInvalidatePattern(b.namespace, b.pattern))
    return reply({"invalidated": removed, "namespace": b.namespace})


@require("admin", "agent")
async def cache_flush(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("namespace",))
    ns = _namespace(request)
    return reply({"flushed": await _cache(request, CacheFlush(ns)), "namespace": ns})


@require("admin", "agent", "approver")
async def cache_stats(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("namespace",))
    ns = request.query.get("namespace")
    return reply(await _cache(request, CacheStatsQuery(ns)))


# -- sessions -----------------------------------------------------------------------------------------------------
def _own_session(who: Principal, session: Session) -> None:
    if who.role not in ("admin", "agent") and session.user_id != who.user_id:
        raise ProblemError(404, "Not found", "no such session")


@require()
async def session_create(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    b = await body(request, SessionCreateBody)
    if who.role not in ("admin", "agent") and b.user_id != who.user_id:
        raise forbidden("only admins and agents create sessions for other users")
    session = await ask(
        request, "sessions", SessionCreate(b.user_id, b.data, b.idle_ttl, b.absolute_ttl)
    )
    return reply(session, 201)


@require()
async def session_get(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("touch",))
    touch = request.query.get("touch", "true") != "false"
    session = await ask(request, "sessions", SessionGet(request.match_info["id"], touch=touch))
    _own_session(who, session)
    return reply(session)


@require()
async def session_update(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    b = await body(request, SessionUpdateBody)
    session_id = request.match_info["id"]
    _own_session(who, await ask(request, "sessions", SessionGet(session_id, touch=False)))
    version = await ask(request, "sessions", SessionUpdate(session_id, b.data, b.version))
    return reply({"version": version})


@require()
async def session_delete(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    session_id = request.match_info["id"]
    _own_session(who, await ask(request, "sessions", SessionGet(session_id, touch=False)))
    await ask(request, "sessions", SessionDelete(session_id))
    return web.Response(status=204)


ROUTES: list[RouteDoc] = [
    RouteDoc(
        "POST", "/cache/set", cache_set, "Store a value (TTL, NX/XX, KEEPTTL, tags)", CacheSetBody
    ),
    RouteDoc("GET", "/cache/get/{key}", cache_get, "Read a value (404 on a miss; ?raw for bytes)"),
    RouteDoc("DELETE", "/cache/{key}", cache_delete, "Delete a key"),
    RouteDoc("GET", "/cache/exists/{key}", cache_exists, "Whether a key exists"),
    RouteDoc(
        "POST",
        "/cache/invalidate",
        cache_invalidate,
        "Invalidate by tags or by pattern",
        CacheInvalidateBody,
    ),
    RouteDoc("DELETE", "/cache", cache_flush, "Flush one namespace (and nothing else)"),
    RouteDoc("GET", "/cache/stats", cache_stats, "Cache statistics per namespace"),
    RouteDoc(
        "POST",
        "/sessions",
        session_create,
        "Create a session for a user",
        SessionCreateBody,
        Session,
        201,
    ),
    RouteDoc("GET", "/sessions/{id}", session_get, "Read (and touch) a session", response=Session),
    RouteDoc(
        "PUT",
        "/sessions/{id}",
        session_update,
        "Replace a session's data (optional expected version)",
        SessionUpdateBody,
    ),
    RouteDoc("DELETE", "/sessions/{id}", session_delete, "Delete a session", status=204),
]


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
