"""``POST /auth/login`` and ``POST /auth/logout`` (DESIGN §8).

A login costs one scrypt verification whether or not the user exists or has a
password, so its timing tells nothing. Attempts are counted per user name and
per client address (``[auth]``) before the password is checked, atomically; a
right one is taken back. Past the limit the answer is 429 with Retry-After,
and no password is checked.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from aiohttp import web

from actors import persistence as m
from actors.data.credentials import TOKEN_PREFIX
from actors.data.model import NO_NUL, User
from actors.sessions import (
    LoginAttempt,
    LoginSucceeded,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionNotFound,
    SessionRotate,
)
from jarvisd.http.auth import Unauthorized, bearer, forget
from jarvisd.http.common import RouteDoc, actors_of, body, reply
from jarvisd.http.errors import ProblemError, reject_unknown_params
from jarvisd.http.keys import RUNTIME
from jarvisd.http.shares import client_address
from jarvisd.principals import Invalidation, bearer_key

__all__ = ["ROUTES"]


class Login(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    username: Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=NO_NUL)]
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class LoginReply(msgspec.Struct, frozen=True, rename="camel"):
    token: str
    expires_at: datetime  # the session's absolute deadline (RFC 3339)
    user: User


async def login(request: web.Request) -> web.Response:
    """Password in, session token out. A session token presented with the
    request is rotated (same session, new id) rather than kept: no fixation."""
    reject_unknown_params(request, ())
    creds = await body(request, Login)
    address = client_address(request, request.app[RUNTIME].settings.http)
    # Counted before the password is checked: of many attempts at once, only
    # the first auth.login_failures_* are checked at all.
    wait = await actors_of(request).logins.ask(LoginAttempt(creds.username, address))
    if wait > 0:
        raise ProblemError(
            429,
            "Too many requests",
            "too many failed logins for this user or address; try again later",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    try:
        checked = await actors_of(request).persistence.ask(
            m.CheckPassword(username=creds.username, password=creds.password),
        )
    except Exception:
        # Not checked (the database did not answer): the attempt does not count.
        await actors_of(request).logins.ask(LoginSucceeded(creds.username, address))
        raise
    if checked is None:
        raise Unauthorized("wrong username or password")
    await actors_of(request).logins.ask(LoginSucceeded(creds.username, address))
    who, stamp = checked
    assert who.user_id is not None  # a password belongs to a user
    user = await actors_of(request).persistence.ask(m.GetUser(user_id=who.user_id))
    presented = _session_token(request)
    session = None
    if presented is not None:
        try:
            current = await actors_of(request).logins.ask(SessionGet(presented, touch=False))
            if current.user_id == user.id and current.stamp == stamp:
                session = await actors_of(request).logins.ask(SessionRotate(presented))
            else:
                await actors_of(request).logins.ask(SessionDelete(presented))
            await forget(request, Invalidation(kind="bearer", key=bearer_key(presented)))
        except SessionNotFound:
            session = None
    if session is None:
        session = await actors_of(request).logins.ask(
            SessionCreate(user.id, {"login": "password"}, stamp=stamp)
        )
    # A password change or a disable that landed during this login revoked the
    # user's sessions before ours existed: ours must not survive it.
    assert session.id is not None  # made or rotated here: its id is in the reply
    if await actors_of(request).persistence.ask(m.CredentialStamp(user_id=user.id)) != stamp:
        await actors_of(request).logins.ask(SessionDelete(session.id))
        raise Unauthorized("the user's credentials changed during the login; log in again")
    deadline = datetime.fromtimestamp(session.expires_at_ms / 1000, UTC)
    return reply(LoginReply(token=session.id, expires_at=deadline, user=user), 201)


def _session_token(request: web.Request) -> str | None:
    try:
        token = bearer(request)
    except ProblemError:
        return None
    return None if token is None or token.startswith(TOKEN_PREFIX) else token


async def logout(request: web.Request) -> web.Response:
    reject_unknown_params(request, ())
    token = bearer(request)
    if token is None:
        raise Unauthorized("log out with the session token as Authorization: Bearer")
    if token.startswith(TOKEN_PREFIX):
        raise ProblemError(
            403,
            "Not a session",
            "an API token is not a session: revoke it with DELETE /users/{id}/tokens/{tokenId}",
        )
    if not await actors_of(request).logins.ask(SessionDelete(token)):
        raise Unauthorized("invalid or expired session")
    await forget(request, Invalidation(kind="bearer", key=bearer_key(token)))
    return web.Response(status=204)


ROUTES: list[RouteDoc] = [
    RouteDoc(
        "POST",
        "/auth/login",
        login,
        "Log in with a password; returns a session token",
        Login,
        LoginReply,
        201,
        statuses=(429,),
    ),
    RouteDoc(
        "POST",
        "/auth/logout",
        logout,
        "End the session given as the bearer token",
        status=204,
        body_required=False,
    ),
]
