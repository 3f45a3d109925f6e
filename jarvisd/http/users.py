"""Users, their API tokens and their sessions (DESIGN §8).

| route | admin | approver, user, agent |
|---|---|---|
| list, create, delete users; change a role or disabled | yes | - |
| read a user; change email, preferences, password | any | self |
| a user's tokens and sessions | any | self |

A new password needs the current one (``currentPassword``), except when an
admin sets someone else's. Changing a password or disabling a user ends their
login sessions; deleting a user ends their application sessions too.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from actors import persistence as m
from actors.data.model import (
    Page,
    Principal,
    Token,
    TokenCreate,
    TokenCreated,
    User,
    UserCreate,
    UserUpdate,
)
from actors.data.repo import USERS
from actors.sessions import Session, SessionList, SessionRevokeAll
from jarvisd.http.agents import apply_agents
from jarvisd.http.auth import forbidden, forget, require
from jarvisd.http.common import RouteDoc, actors_of, body, list_query, listed, path_id, reply
from jarvisd.http.errors import reject_unknown_params
from jarvisd.http.keys import RUNTIME
from jarvisd.principals import Invalidation

__all__ = ["ROUTES"]


class Revoked(msgspec.Struct, frozen=True):
    revoked: int


def self_or_admin(who: Principal, user_id: int) -> None:
    if not who.is_admin and who.user_id != user_id:
        raise forbidden("only an admin acts on other users")


@require("admin")
async def list_users(request: web.Request, who: Principal) -> web.Response:
    lq, count = list_query(request, USERS)
    return listed(
        await actors_of(request).persistence.ask(m.ListUsers(query=lq, count=count, as_json=True)),
        count,
    )


@require()
async def get_user(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    return reply(await actors_of(request).persistence.ask(m.GetUser(user_id=user_id)))


@require("admin")
async def create_user(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    new = await body(request, UserCreate)
    user = await actors_of(request).persistence.ask(m.CreateUser(new=new))
    return reply(user, 201, {"Location": f"/users/{user.id}"})


@require()
async def update_user(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    change = await body(request, UserUpdate)
    if not who.is_admin and (
        change.role is not msgspec.UNSET or change.disabled is not msgspec.UNSET
    ):
        raise forbidden("only an admin changes roles or disables users")
    resetting_someone_else = who.is_admin and who.user_id != user_id
    user = await actors_of(request).persistence.ask(
        m.UpdateUser(user_id=user_id, change=change, verify_current=not resetting_someone_else),
    )
    if change.disabled is True or change.password is not msgspec.UNSET:
        # Old login sessions must not outlive the change.
        await actors_of(request).logins.ask(SessionRevokeAll(user_id))
    if any(v is not msgspec.UNSET for v in (change.role, change.disabled, change.password)):
        await forget(request, Invalidation(kind="user", user_id=user_id))
    if change.role is not msgspec.UNSET or change.disabled is not msgspec.UNSET:
        await apply_agents(request)  # an agent disabled or demoted: its Redis user goes too
    return reply(user)


@require("admin")
async def delete_user(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    await actors_of(request).persistence.ask(m.DeleteUser(user_id=user_id))
    request.app[RUNTIME].lists.changed()  # their commands' userId is now null
    await forget(request, Invalidation(kind="user", user_id=user_id))
    for store in (actors_of(request).logins, actors_of(request).sessions):
        await store.ask(SessionRevokeAll(user_id))
    await apply_agents(request)  # an agent's Redis user goes with it
    return web.Response(status=204)


@require()
async def list_tokens(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    await actors_of(request).persistence.ask(m.GetUser(user_id=user_id))  # 404 for an unknown user
    return reply(await actors_of(request).persistence.ask(m.ListTokens(user_id=user_id)))


@require()
async def create_token(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    new = await body(request, TokenCreate)
    auth = request.app[RUNTIME].settings.auth
    cap = auth.token_max_ttl
    if cap:
        new = msgspec.structs.replace(new, expires_in=min(new.expires_in or cap, cap))
    msg = m.CreateToken(user_id=user_id, new=new, max_live=auth.max_tokens_per_user)
    return reply(await actors_of(request).persistence.ask(msg), 201)


@require()
async def revoke_token(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    token_id = path_id(request, "tokenId")
    revoked = await actors_of(request).persistence.ask(
        m.RevokeToken(token_id=token_id, user_id=user_id)
    )
    await forget(request, Invalidation(kind="user", user_id=user_id))
    return reply(revoked)


@require()
async def list_user_sessions(request: web.Request, who: Principal) -> web.Response:
    """Login sessions (kind "login") and application sessions (kind "app")."""
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    found: list[Any] = []
    for store in (actors_of(request).logins, actors_of(request).sessions):
        found.extend(await store.ask(SessionList(user_id)))
    return reply(found)


@require()
async def revoke_user_sessions(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    removed = 0
    for store in (actors_of(request).logins, actors_of(request).sessions):
        removed += await store.ask(SessionRevokeAll(user_id))
    await forget(request, Invalidation(kind="user", user_id=user_id))
    return reply(Revoked(removed))


ROUTES: list[RouteDoc] = [
    RouteDoc("GET", "/users", list_users, "List users", response=Page[User], list_spec=USERS),
    RouteDoc("POST", "/users", create_user, "Create a user", UserCreate, User, 201),
    RouteDoc("GET", "/users/{id}", get_user, "Read a user", response=User),
    RouteDoc(
        "PUT", "/users/{id}", update_user, "Change a user (fields present only)", UserUpdate, User
    ),
    RouteDoc(
        "DELETE",
        "/users/{id}",
        delete_user,
        "Delete a user (the audit keeps their records)",
        status=204,
    ),
    RouteDoc(
        "GET", "/users/{id}/tokens", list_tokens, "List a user's API tokens", response=list[Token]
    ),
    RouteDoc(
        "POST",
        "/users/{id}/tokens",
        create_token,
        "Create an API token (shown once)",
        TokenCreate,
        TokenCreated,
        201,
    ),
    RouteDoc(
        "DELETE",
        "/users/{id}/tokens/{tokenId}",
        revoke_token,
        "Revoke an API token",
        response=Token,
    ),
    RouteDoc(
        "GET",
        "/users/{id}/sessions",
        list_user_sessions,
        "List a user's login and application sessions",
        response=list[Session],
    ),
    RouteDoc(
        "DELETE",
        "/users/{id}/sessions",
        revoke_user_sessions,
        "End all of a user's login and application sessions",
        response=Revoked,
    ),
]
