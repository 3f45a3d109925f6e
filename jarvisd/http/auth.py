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

import os
import socket
import struct
from collections.abc import Awaitable, Callable

from aiohttp import web

from actors.data.credentials import TOKEN_PREFIX
from actors.data.messages import AuthenticateToken, AuthenticateUser
from actors.data.model import Principal
from actors.sessions import SessionGet, SessionNotFound
from jarvisd.http.errors import ProblemError
from jarvisd.http.keys import RUNTIME

__all__ = ["Unauthorized", "authenticate", "bearer", "forbidden", "peer_uid", "require"]

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
            session = await rt.actor("logins").ask(SessionGet(token), timeout=timeout)
        except SessionNotFound:
            raise Unauthorized("invalid or expired session") from None
        principal = await rt.actor("persistence").ask(
            AuthenticateUser(user_id=session.user_id), timeout=timeout
        )
        if principal is None:
            raise Unauthorized("the session's user is disabled or no longer exists")
        return principal  # type: ignore[no-any-return]
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
