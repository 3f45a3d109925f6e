"""The request pipeline every route goes through: admission and limits
(``http.max_in_flight``, body size, draining), optional authentication of
health routes, the mapping of errors to problem documents, metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import asyncpg
import msgspec
import structlog
from aiohttp import web

from actors import ActorDead, ActorStopped, AskTimeout, MailboxFull
from actors.approvals import WatchersFull
from actors.cache import CacheError
from actors.data.repo import Conflict, Forbidden, Invalid, NotFound
from actors.persistence import Unavailable
from actors.redis_link import RedisUnavailable
from actors.sessions import SessionConflict, SessionNotFound
from jarvisd.http.auth import Unauthorized, authenticate, known
from jarvisd.http.common import ClientGone
from jarvisd.http.errors import ProblemError, problem
from jarvisd.http.keys import ADMITTED, HTTP_METRICS, RUNTIME, TRANSPORTS

__all__ = ["ALWAYS_SERVED", "UNAVAILABLE", "observe"]

log = structlog.get_logger("jarvisd", actor="http")  # lazy: follows configure()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Served while draining, so orchestration can watch the daemon go away.
ALWAYS_SERVED = frozenset({"/health/live", "/health/ready", "/health", "/metrics", "/stats"})
# Open by default; behind authentication with http.public_health = false.
GUARDED_HEALTH = frozenset(
    {"/health/ready", "/health", "/stats", "/metrics", "/redis/health", "/redis/stats"}
)
# With public_health = false those ask for a token, which may mean a database
# lookup: the ones always served stay outside http.max_in_flight (monitoring
# goes on under overload), and those that need a lookup have this budget.
GUARDED_IN_FLIGHT = 64
# What a dependency down or a full mailbox raises: "try again", never a bug
# (503 over HTTP, 1013 on an upgraded socket).
UNAVAILABLE = (
    MailboxFull,
    ActorDead,
    ActorStopped,
    AskTimeout,
    Unavailable,
    RedisUnavailable,  # the cache's and the sessions' too
    WatchersFull,
)


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[HTTP_METRICS]
    rt = request.app[RUNTIME]
    started = time.perf_counter()
    status = 500
    metrics.in_flight += 1
    # Requests count against http.max_in_flight, health aside (always
    # answered) and WebSockets (capped on their own); a long-poll gives its
    # place back once it starts waiting (release_admission).
    admitted = request.path not in ALWAYS_SERVED and request.path != "/ws"
    if request.transport is not None:  # watched for a peer that stops reading
        request.app[TRANSPORTS].add(request.transport)
    if admitted:
        metrics.admitted += 1
        request[ADMITTED] = True
    try:
        limit = rt.settings.http.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            response: web.StreamResponse = problem(
                413,
                "Payload too large",
                f"request body of {request.content_length} bytes is over "
                f"the limit of {limit} bytes (http.max_body_bytes)",
            )
        elif admitted and metrics.admitted > rt.settings.http.max_in_flight:
            response = _overloaded(
                request,
                f"over {rt.settings.http.max_in_flight} requests in progress (http.max_in_flight)",
            )
        elif not rt.settings.http.public_health and request.path in GUARDED_HEALTH:
            response = await _guarded_health(request, handler)
        elif rt.draining and request.path not in ALWAYS_SERVED:
            response = problem(
                503, "Draining", "jarvisd is shutting down", headers={"Retry-After": "5"}
            )
        else:
            # The route's errors answered here (no coroutine of its own: one
            # frame less on every request).
            try:
                response = await handler(request)
            except Exception as exc:
                response = _answer(request, exc)
        status = response.status
        return response
    finally:
        metrics.in_flight -= 1
        if request.get(ADMITTED):
            metrics.admitted -= 1
        metrics.observe(request.method, _route_name(request), status, time.perf_counter() - started)


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        return _answer(request, exc)


def _answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The problem document for what a route raised (called in its ``except``:
    a redirect is raised again, as it is)."""
    if isinstance(exc, ProblemError):
        return exc.response()
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return problem(
            413, "Payload too large", exc.text or "request body over http.max_body_bytes"
        )
    if isinstance(exc, web.HTTPException):
        if exc.status >= 400:
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            detail = f"{request.method} {request.path}: {exc.reason.lower()}"
            return problem(exc.status, exc.reason, detail, headers=allow)
        raise exc  # a redirect, as it is
    if isinstance(exc, (NotFound, SessionNotFound)):
        return problem(404, "Not found", str(exc).strip("'\""))
    if isinstance(exc, Conflict):
        extra = {"current": msgspec.to_builtins(exc.current)} if exc.current is not None else None
        return problem(409, "Conflict", str(exc), extra=extra)
    if isinstance(exc, SessionConflict):
        return problem(409, "Conflict", str(exc), extra={"currentVersion": exc.current})
    if isinstance(exc, Forbidden):
        return problem(403, "Forbidden", str(exc))
    if isinstance(exc, (Invalid, CacheError)):
        return problem(400, "Bad request", str(exc))
    if isinstance(exc, asyncpg.DataError):
        # Input the schema let through but PostgreSQL cannot store (NUL in text, \u0000 in JSON, ...).
        return problem(400, "Invalid data", exc.args[0] if exc.args else type(exc).__name__)
    if isinstance(exc, UnicodeError):
        return problem(400, "Invalid data", "text that is not valid Unicode")
    if isinstance(exc, ClientGone):
        log.info("http_client_gone", route=_route_name(request), method=request.method)
        return problem(400, "Bad request", "the client closed the connection")
    if isinstance(exc, UNAVAILABLE):
        return problem(503, "Service unavailable", str(exc), headers={"Retry-After": "1"})
    # Anything else is a bug. The route's template is logged, never the
    # path: a path may hold a session id.
    log.exception("http_handler_failed", route=_route_name(request), method=request.method)
    return problem(500, "Internal error", "the request failed; the daemon log has the details")


def _overloaded(request: web.Request, why: str) -> web.Response:
    request.app[HTTP_METRICS].refused += 1
    return problem(503, "Overloaded", f"{why}; try again shortly", headers={"Retry-After": "1"})


async def _guarded_health(request: web.Request, handler: Handler) -> web.StreamResponse:
    if known(request):  # no lookup to bound: a monitor already known always gets in
        return await _guarded(request, _authenticated(handler))
    metrics = request.app[HTTP_METRICS]
    if metrics.guarded >= GUARDED_IN_FLIGHT:
        return _overloaded(
            request, f"{GUARDED_IN_FLIGHT} authenticated health requests are in progress"
        )
    metrics.guarded += 1
    try:
        return await _guarded(request, _authenticated(handler))
    finally:
        metrics.guarded -= 1


def _authenticated(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if await authenticate(request) is None:
            raise Unauthorized("authentication required (http.public_health = false)")
        return await handler(request)

    return guarded
