"""HTTP routes of the cache actor (DESIGN §7, §8).

Admins and agents (the services that cache) use the cache; approvers may read
its statistics. Namespaces are names clients choose; jarvisd keeps nothing of
its own in them, so nothing written here is ever read back as authority.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from actors.cache import (
    CacheDelete,
    CacheError,
    CacheExists,
    CacheFlush,
    CacheGet,
    CacheInvalidatePattern,
    CacheInvalidateTags,
    CacheSet,
    CacheStatsQuery,
    clamp_ttl_ms,
)
from actors.cache.messages import MAX_TAGS, NAMESPACE_RE, Mode
from actors.data.model import Principal
from jarvisd.http.auth import require
from jarvisd.http.common import RouteDoc, actors_of, body, query_param, reply
from jarvisd.http.errors import ProblemError, reject_unknown_params
from jarvisd.http.keys import RUNTIME

__all__ = ["ROUTES"]

DEFAULT_NS = "default"
# Characters, so that any key the schema allows fits the actor's byte limit.
MAX_KEY_CHARS = 1024
CacheKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_CHARS)]
Namespace = Annotated[str, msgspec.Meta(pattern=NAMESPACE_RE.pattern)]
# Seconds; the schema's bound only keeps numbers sane, cache.max_ttl caps them.
Ttl = Annotated[float, msgspec.Meta(ge=0.001, le=10 * 365 * 86400)]
NAMESPACE = (
    "namespace",
    {"type": "string", "pattern": NAMESPACE_RE.pattern, "default": DEFAULT_NS},
    "the cache namespace",
)
RAW = (
    "raw",
    {"type": "string", "enum": ["", "true", "false"]},
    "?raw or ?raw=true: answer the stored bytes as they are",
)


class CacheSetBody(
    msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True
):
    key: CacheKey
    value: Any
    namespace: Namespace = DEFAULT_NS
    # Seconds (fractions allowed), or "keep" to keep the key's current TTL;
    # absent: cache.default_ttl. Capped at cache.max_ttl.
    ttl: Ttl | Literal["keep"] | None = None
    # NX: only if the key is absent; XX: only if it exists.
    mode: Literal["NX", "XX"] | None = None
    tags: Annotated[list[CacheKey], msgspec.Meta(max_length=MAX_TAGS)] = msgspec.field(
        default_factory=list
    )


class CacheSetReply(msgspec.Struct, frozen=True, rename="camel"):
    stored: bool
    key: str
    namespace: str
    ttl_ms: int | None  # the TTL applied (None: the key's own was kept)


class CacheInvalidateBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Tags, a pattern, or both (their counts add up); neither invalidates nothing."""

    namespace: Namespace = DEFAULT_NS
    tags: Annotated[list[CacheKey], msgspec.Meta(max_length=MAX_TAGS)] = msgspec.field(
        default_factory=list
    )
    pattern: CacheKey | None = None


class CacheValue(msgspec.Struct, frozen=True):
    key: str
    value: Any
    hit: bool


class Invalidated(msgspec.Struct, frozen=True):
    invalidated: int
    namespace: str


class Flushed(msgspec.Struct, frozen=True):
    flushed: int
    namespace: str


class Deleted(msgspec.Struct, frozen=True):
    deleted: int


class Exists(msgspec.Struct, frozen=True):
    exists: bool


def _namespace(request: web.Request) -> str:
    ns = query_param(request, "namespace", DEFAULT_NS)
    assert ns is not None
    return ns  # an empty or malformed one is refused by the cache actor (400)


def _key(request: web.Request) -> str:
    key = request.match_info["key"]
    if len(key) > MAX_KEY_CHARS:
        raise ProblemError(400, "Bad request", f"a key is at most {MAX_KEY_CHARS} characters")
    return key


async def _cache(request: web.Request, msg: Any) -> Any:
    try:
        return await actors_of(request).cache.ask(msg)
    except CacheError as exc:
        if "over the limit" in str(exc):
            raise ProblemError(413, "Payload too large", str(exc)) from None
        raise ProblemError(400, "Bad request", str(exc)) from None


@require("admin", "agent")
async def cache_set(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    b = await body(request, CacheSetBody)
    keep = b.ttl == "keep"
    ttl_ms = None
    if not keep:
        asked = None if b.ttl is None else max(1, round(float(b.ttl) * 1000))
        ttl_ms = clamp_ttl_ms(request.app[RUNTIME].settings.cache, asked)
    mode: Mode = b.mode or ""
    stored = await _cache(
        request,
        CacheSet(
            b.namespace,
            b.key,
            b.value,
            ttl_ms=ttl_ms,
            mode=mode,
            keepttl=keep,
            tags=tuple(b.tags),
        ),
    )
    return reply(CacheSetReply(stored=stored, key=b.key, namespace=b.namespace, ttl_ms=ttl_ms))


@require("admin", "agent")
async def cache_get(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("namespace", "raw"))
    key = _key(request)
    raw_flag = query_param(request, "raw")
    if raw_flag not in (None, "", "true", "false"):
        raise ProblemError(400, "Bad request", "raw is a flag: ?raw, ?raw=true or ?raw=false")
    raw = raw_flag in ("", "true")
    hit, value = await _cache(request, CacheGet(_namespace(request), key, raw=raw))
    if not hit:
        raise ProblemError(404, "Not found", "no cached value for that key")
    if raw:
        return web.Response(body=value, content_type="application/octet-stream")
    return reply(CacheValue(key=key, value=value, hit=True))


@require("admin", "agent")
async def cache_delete(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("namespace",))
    deleted = await _cache(request, CacheDelete(_namespace(request), (_key(request),)))
    return reply(Deleted(deleted))


@require("admin", "agent")
async def cache_exists(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("namespace",))
    found = await _cache(request, CacheExists(_namespace(request), (_key(request),)))
    return reply(Exists(bool(found)))


@require("admin", "agent")
async def cache_invalidate(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    b = await body(request, CacheInvalidateBody)
    removed = 0
    if b.tags:
        removed += await _cache(request, CacheInvalidateTags(b.namespace, tuple(b.tags)))
    if b.pattern is not None:
        removed += await _cache(request, CacheInvalidatePattern(b.namespace, b.pattern))
    return reply(Invalidated(removed, b.namespace))


@require("admin", "agent")
async def cache_flush(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("namespace",))
    ns = _namespace(request)
    return reply(Flushed(await _cache(request, CacheFlush(ns)), ns))


@require("admin", "agent", "approver")
async def cache_stats(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("namespace",))
    ns = query_param(request, "namespace")
    return reply(await _cache(request, CacheStatsQuery(ns)))


ROUTES: list[RouteDoc] = [
    RouteDoc(
        "POST",
        "/cache/set",
        cache_set,
        "Store a value (TTL or keep, NX/XX, tags)",
        CacheSetBody,
        CacheSetReply,
    ),
    RouteDoc(
        "GET",
        "/cache/get/{key}",
        cache_get,
        "Read a value (404 on a miss; ?raw for the stored bytes)",
        response=CacheValue,
        query=(NAMESPACE, RAW),
        raw_content="application/octet-stream",
    ),
    RouteDoc(
        "DELETE",
        # The route's own paths (/cache/set, /cache/stats, ...) are not keys
        # here, so each of them allows exactly its own methods.
        "/cache/{key}",
        cache_delete,
        "Delete a key",
        response=Deleted,
        query=(NAMESPACE,),
    ),
    RouteDoc(
        "GET",
        "/cache/exists/{key}",
        cache_exists,
        "Whether a key exists",
        response=Exists,
        query=(NAMESPACE,),
    ),
    RouteDoc(
        "POST",
        "/cache/invalidate",
        cache_invalidate,
        "Invalidate by tags, by pattern, or both",
        CacheInvalidateBody,
        Invalidated,
    ),
    RouteDoc(
        "DELETE",
        "/cache",
        cache_flush,
        "Flush one namespace (and nothing else)",
        response=Flushed,
        query=(NAMESPACE,),
    ),
    RouteDoc(
        "GET",
        "/cache/stats",
        cache_stats,
        "Cache statistics per namespace",
        response=dict[str, Any],
        query=(NAMESPACE,),
    ),
]
