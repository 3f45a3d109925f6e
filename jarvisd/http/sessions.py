"""Application sessions: the session store services keep for their users
(DESIGN §7, §8). They hold data and nothing else: no route authenticates with
them, so creating one never gives anyone authority.

| route | admin | agent | approver, user |
|---|---|---|---|
| POST /sessions | for any user | for any user | for self |
| GET, PUT, DELETE /sessions/{id} | any | any | own |

Another user's session is "not found". Lifetimes asked for are capped at
``sessions.max_ttl``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from aiohttp import web

from actors import persistence as m
from actors.data.model import Principal, RowId
from actors.sessions import Session, SessionCreate, SessionDelete, SessionGet, SessionUpdate
from jarvisd.http.auth import forbidden, require
from jarvisd.http.common import RouteDoc, actors_of, body, query_param, reply
from jarvisd.http.errors import ProblemError, reject_unknown_params

__all__ = ["ROUTES"]

TOUCH = (
    "touch",
    {"type": "string", "enum": ["true", "false"]},
    "false reads without sliding the idle TTL",
)
# Seconds; the schema's bound only keeps numbers sane, the config caps them.
Lifetime = Annotated[int, msgspec.Meta(ge=1, le=10 * 365 * 86400)]


class SessionCreateBody(
    msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True
):
    user_id: RowId
    data: Any = None
    idle_ttl: Lifetime | None = None
    absolute_ttl: Lifetime | None = None


class SessionUpdateBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    data: Any
    version: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)] | None = None


class SessionVersion(msgspec.Struct, frozen=True):
    version: int


class SessionView(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """A session as the API shows it: times in RFC 3339, like every other answer."""

    ref: str
    kind: str
    user_id: int
    data: Any
    version: int
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime  # the absolute deadline
    id: str | None = None  # only when the session is created


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def view(s: Session) -> SessionView:
    return SessionView(
        ref=s.ref,
        kind=s.kind,
        user_id=s.user_id,
        data=s.data,
        version=s.version,
        created_at=at(s.created_ms),
        last_seen_at=at(s.last_seen_ms),
        expires_at=at(s.expires_at_ms),
        id=s.id,
    )


def _store_for(who: Principal) -> bool:
    """Admins and agents (the services that keep sessions) act for any user."""
    return who.role in ("admin", "agent")


async def _visible(request: web.Request, who: Principal, session_id: str) -> Session:
    session: Session = await actors_of(request).sessions.ask(SessionGet(session_id, touch=False))
    if not _store_for(who) and session.user_id != who.user_id:
        raise ProblemError(404, "Not found", "no such session")
    return session


@require()
async def session_create(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    b = await body(request, SessionCreateBody)
    if not _store_for(who) and b.user_id != who.user_id:
        raise forbidden("only admins and agents create sessions for other users")
    await actors_of(request).persistence.ask(
        m.GetUser(user_id=b.user_id)
    )  # 404 for an unknown user
    session = await actors_of(request).sessions.ask(
        SessionCreate(b.user_id, b.data, b.idle_ttl, b.absolute_ttl)
    )
    return reply(view(session), 201)


@require()
async def session_get(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("touch",))
    touch_param = query_param(request, "touch", "true")
    if touch_param not in ("true", "false"):
        raise ProblemError(400, "Bad request", "touch is true or false")
    touch = touch_param == "true"
    session_id = request.match_info["id"]
    await _visible(request, who, session_id)
    return reply(view(await actors_of(request).sessions.ask(SessionGet(session_id, touch=touch))))


@require()
async def session_update(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    b = await body(request, SessionUpdateBody)
    session_id = request.match_info["id"]
    await _visible(request, who, session_id)
    version = await actors_of(request).sessions.ask(SessionUpdate(session_id, b.data, b.version))
    return reply(SessionVersion(version))


@require()
async def session_delete(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    session_id = request.match_info["id"]
    await _visible(request, who, session_id)
    await actors_of(request).sessions.ask(SessionDelete(session_id))
    return web.Response(status=204)


ROUTES: list[RouteDoc] = [
    RouteDoc(
        "POST",
        "/sessions",
        session_create,
        "Create an application session for a user (data only; never a credential)",
        SessionCreateBody,
        SessionView,
        201,
    ),
    RouteDoc(
        "GET",
        "/sessions/{id}",
        session_get,
        "Read (and touch) an application session",
        response=SessionView,
        query=(TOUCH,),
    ),
    RouteDoc(
        "PUT",
        "/sessions/{id}",
        session_update,
        "Replace an application session's data (optional expected version)",
        SessionUpdateBody,
        SessionVersion,
    ),
    RouteDoc(
        "DELETE", "/sessions/{id}", session_delete, "Delete an application session", status=204
    ),
]
