"""Who is calling (DESIGN §8).

- ``Authorization: Bearer jv_…`` is an API token (checked in PostgreSQL);
  any other bearer value is a login session token from ``POST /auth/login``,
  looked up in the login key space (the ``logins`` actor), which no API route
  writes. The user behind it is read from PostgreSQL. Authority is never
  read from anything a client can set: not the cache, not application
  sessions (``/sessions``), which are data only.
- A request on the Unix socket from the daemon's own uid or root, without a
  token, is the local admin (SO_PEERCRED): the CLI and operators on the box.
- No credentials: 401 with ``WWW-Authenticate: Bearer``. Valid credentials
  without the right: 403.
"""

from __future__ import annotations

import asyncio
import copy
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from aiohttp import web

from actors.data.credentials import TOKEN_PREFIX
from actors.data.model import Principal
from actors.persistence import AuthenticateToken, AuthenticateUser
from actors.pubsub import Publish
from actors.sessions import SessionGet, SessionNotFound
from jarvisd.http.errors import ProblemError
from jarvisd.http.keys import RUNTIME
from jarvisd.principals import Invalidation, bearer_key, encode_invalidation, internal_channel
from jarvisd.runtime import Runtime

__all__ = [
    "Unauthorized",
    "authenticate",
    "bearer",
    "forbidden",
    "forget",
    "known",
    "peer_uid",
    "principal_of",
    "require",
]

log = structlog.get_logger("jarvisd", actor="http")

_PEERCRED = struct.Struct("3i")
MAX_TOKEN_LENGTH = 512


class Unauthorized(ProblemError):
    def __init__(self, detail: str) -> None:
        super().__init__(401, "Unauthorized", detail)

    def response(self) -> web.Response:
        resp = super().response()
        resp.headers["WWW-Authenticate"] = 'Bearer realm="jarvisd"'
        return resp


def forbidden(detail: str) -> ProblemError:
    return ProblemError(403, "Forbidden", detail)


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process on the other end of a Unix socket, else None."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        _pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except OSError:
        return None
    return int(uid)


def bearer(request: web.Request) -> str | None:
    """The bearer token, None without an Authorization header, 401 for any
    other scheme or shape. Error details never quote the header."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if (
        scheme.lower() != "bearer"
        or not token
        or len(token) > MAX_TOKEN_LENGTH
        or not token.isascii()
        or not token.isprintable()
    ):
        raise Unauthorized("use Authorization: Bearer <token>")
    return token


def known(request: web.Request) -> bool:
    """Whether authenticate() can answer without a lookup: no credentials,
    malformed ones, or a token the principal cache holds."""
    try:
        token = bearer(request)
    except Unauthorized:
        return True
    return token is None or request.app[RUNTIME].principals.holds(bearer_key(token))


async def authenticate(request: web.Request) -> Principal | None:
    """The caller, or None when no credentials were presented; raises 401 for bad ones."""
    rt = request.app[RUNTIME]
    token = bearer(request)
    if token is not None:
        return await principal_of(rt, token)
    uid = peer_uid(request)
    if uid is not None and uid in (0, os.geteuid()):
        return Principal(user_id=None, role="admin", name=f"uid:{uid}", via="peer")
    return None


async def principal_of(rt: Runtime, token: str) -> Principal:
    """Who a bearer token is now (the caller cache, else one lookup); 401 for
    a token or session that is not (or no longer) valid."""
    key = bearer_key(token)
    entry = rt.principals.get(key)
    if entry is not None:
        if entry.principal.via == "session":
            await _slide(rt, token, key, entry)
        return entry.principal
    return await _lookup_once(rt, token, key)


async def _lookup_once(rt: Runtime, token: str, key: str) -> Principal:
    """One lookup per key at a time: the others asking meanwhile share its
    answer (or its 401). Never while the cache is off (its invalidations
    cannot arrive) nor across an invalidation; a cancelled lookup lets each
    of them try its own."""
    cache = rt.principals
    while True:
        began, pending = cache.lookups.get(key, (None, None))
        if pending is None or began != cache.generation or not cache.enabled:
            break
        cache.coalesced += 1
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not pending.cancelled() or (task is not None and task.cancelling()):
                raise  # this request was cancelled, not (only) the lookup
        except Exception as exc:
            # Each caller its own exception object: tracebacks are per task.
            raise copy.copy(exc) from None
    future: asyncio.Future[Principal] = asyncio.get_running_loop().create_future()
    generation = cache.generation  # a revocation from here on must win
    cache.lookups[key] = (generation, future)
    try:
        principal = await _lookup(rt, token)
        cache.put(key, principal, generation, expires_at=principal.expires_at)
        future.set_result(principal)
        return principal
    except asyncio.CancelledError:
        future.cancel()
        raise
    except BaseException as exc:
        future.set_exception(exc)
        future.exception()  # retrieved: nobody may be waiting
        raise
    finally:
        if cache.lookups.get(key, (None, None))[1] is future:
            del cache.lookups[key]


NOT_A_BEARER = (
    "not a valid API token (they start with jv_) or a live login session "
    "(they end on logout, when idle too long, or at their deadline)"
)


async def _lookup(rt: Runtime, token: str) -> Principal:
    if token.startswith(TOKEN_PREFIX):
        principal = await rt.persistence.ask(AuthenticateToken(token=token))
        if principal is None:
            raise Unauthorized("invalid, revoked or expired token")
        return principal
    try:
        session = await rt.logins.ask(SessionGet(token))
    except SessionNotFound:
        raise Unauthorized(NOT_A_BEARER) from None
    principal = await rt.persistence.ask(
        AuthenticateUser(user_id=session.user_id, credentials_version=session.stamp)
    )
    if principal is None:
        raise Unauthorized(
            "the session's user is disabled, no longer exists or changed their password"
        )
    # Kept no longer than the session's absolute deadline.
    found: Principal = msgspec.structs.replace(principal, expires_at=session.expires_at_ms / 1000)
    return found


async def _slide(rt: Runtime, token: str, key: str, entry: Any) -> None:
    """A login session's idle TTL slides in Redis on use: a cached session is
    touched again once in a while (a tenth of the idle TTL, at most a minute),
    which also notices one that ended."""
    every = min(60.0, rt.settings.sessions.idle_ttl / 10)
    if time.monotonic() - entry.touched < every:
        return
    entry.touched = time.monotonic()
    try:
        await rt.logins.ask(SessionGet(token))
    except SessionNotFound:
        rt.principals.invalidate(Invalidation(kind="bearer", key=key))
        raise Unauthorized(NOT_A_BEARER) from None


async def forget(request: web.Request, what: Invalidation) -> None:
    """Drop cached callers here, before the change is answered, and on every
    daemon sharing the Redis (``{prefix}internal:principals``)."""
    rt = request.app[RUNTIME]
    rt.principals.invalidate(what)
    channel = internal_channel(rt.settings.redis.prefix)
    try:
        await rt.pubsub.ask(Publish(channel, encode_invalidation(what)))
    except Exception as exc:  # the others' caches are off while pub/sub is down, or expire
        log.warning("principal_invalidation_not_published", error=repr(exc))


Handler = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]


def require(
    *roles: str,
) -> Callable[[Handler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Route decorator: authenticate, then allow only ``roles`` (all roles when empty)."""

    def wrap(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def route(request: web.Request) -> web.StreamResponse:
            principal = await authenticate(request)
            if principal is None:
                raise Unauthorized("authentication required")
            if roles and principal.role not in roles:
                raise forbidden(f"the {principal.role} role may not do this")
            return await handler(request, principal)

        route.__name__ = handler.__name__
        route.__doc__ = handler.__doc__
        route.__dict__["roles"] = roles
        return route

    return wrap
