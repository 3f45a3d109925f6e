"""Who is calling (DESIGN §8).

- ``Authorization: Bearer jv_…`` is an API token (checked in PostgreSQL);
  any other bearer value is a session token from ``POST /auth/login``
  (checked in Redis by the sessions actor; the user record comes through
  the read-through cache).
- A request on the Unix socket from the daemon's own uid or root, without a
  token, is the local admin (SO_PEERCRED): the CLI and operators on the box.
- No credentials: 401 with ``WWW-Authenticate: Bearer``. Valid credentials
  without the right: 403.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from actors.cache import read_through
from actors.data.credentials import TOKEN_PREFIX
from actors.data.messages import AuthenticateToken, GetUser
from actors.data.model import Principal, User
from actors.sessions import SessionGet, SessionNotFound
from jarvisd.http.errors import ProblemError
from jarvisd.http.keys import RUNTIME
from jarvisd.runtime import Runtime

__all__ = ["authenticate", "bearer", "cached_user", "peer_uid", "require"]

USER_CACHE_NS = "users"
USER_CACHE_TTL_MS = 60_000
_PEERCRED = struct.Struct("3i")


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
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        raise Unauthorized("use Authorization: Bearer <token>")
    return token


async def cached_user(rt: Runtime, user_id: int) -> User:
    """The user record through the read-through cache (tag ``user:<id>``,
    invalidated on every write to that user)."""
    timeout = rt.settings.http.request_timeout

    async def load() -> Any:
        return await rt.actor("persistence").ask(GetUser(user_id=user_id), timeout=timeout)

    cached = await read_through(
        rt.actor("cache"),
        USER_CACHE_NS,
        str(user_id),
        load,
        ttl_ms=USER_CACHE_TTL_MS,
        tags=(f"user:{user_id}",),
        timeout=timeout,
    )
    if isinstance(cached, User):
        return cached
    return msgspec.convert(cached, User)  # from the cache: plain JSON


async def authenticate(request: web.Request) -> Principal | None:
    """The caller, or None when no credentials were presented; raises 401 for bad ones."""
    rt = request.app[RUNTIME]
    timeout = rt.settings.http.request_timeout
    token = bearer(request)
    if token is not None:
        if token.startswith(TOKEN_PREFIX):
            principal = await rt.actor("persistence").ask(
                AuthenticateToken(token=token), timeout=timeout
            )
            if principal is None:
                raise Unauthorized("invalid, revoked or expired token")
            return principal  # type: ignore[no-any-return]
        try:
            session = await rt.actor("sessions").ask(SessionGet(token), timeout=timeout)
        except SessionNotFound:
            raise Unauthorized("invalid or expired session") from None
        try:
            user = await cached_user(rt, session.user_id)
        except LookupError:
            raise Unauthorized("the session's user no longer exists") from None
        if user.disabled:
            raise Unauthorized("the user is disabled")
        return Principal(user_id=user.id, role=user.role, name=user.username, via="session")
    uid = peer_uid(request)
    if uid is not None and uid in (0, os.geteuid()):
        return Principal(user_id=None, role="admin", name=f"uid:{uid}", via="peer")
    return None


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
