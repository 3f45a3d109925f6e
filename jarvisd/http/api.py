"""The REST API for users, tokens, sessions, commands and approvals (DESIGN §8).

Permissions (also in README.md):

| route | admin | approver | user | agent |
|---|---|---|---|---|
| users: list, create, delete, change role or disabled | yes | - | - | - |
| users: read, update email/preferences/password | any | self | self | self |
| tokens and sessions of a user | any | self | self | self |
| commands: create | for anyone | for anyone | for self | for anyone |
| commands: list, read | all | all | own | all |
| commands: status reports (PUT) | yes | - | - | yes |
| approvals: create | yes | yes | yes | yes |
| approvals: list, read | all | all | own | all |
| approvals: approve, reject | yes | not own, not CRITICAL | - | - |
| approvals: cancel | any | own | own | own |

Another user's command or approval is "not found" to a user, not "forbidden":
a user cannot learn which ids exist.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web

from actors.cache import CacheInvalidateTags
from actors.data import messages as m
from actors.data.credentials import TOKEN_PREFIX
from actors.data.listing import ListError, ListSpec, parse_list
from actors.data.model import (
    Approval,
    ApprovalCreate,
    Command,
    CommandCreate,
    CommandStatusUpdate,
    Decision,
    Page,
    Principal,
    Token,
    TokenCreate,
    TokenCreated,
    User,
    UserCreate,
    UserUpdate,
)
from actors.data.repo import APPROVALS, COMMANDS, USERS
from actors.sessions import (
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionList,
    SessionNotFound,
    SessionRevokeAll,
    SessionRotate,
)
from jarvisd.http.auth import bearer, forbidden, require
from jarvisd.http.errors import ProblemError, reject_unknown_params
from jarvisd.http.keys import RUNTIME

T = TypeVar("T")
log = structlog.get_logger("jarvisd").bind(actor="http")
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class RouteDoc:
    """One route, for the router and for /openapi.json."""

    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    body: type | None = None
    response: Any = None
    status: int = 200
    list_spec: ListSpec | None = None
    query: tuple[str, ...] = ()


def reply(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=_encoder.encode(obj), content_type="application/json", headers=headers
    )


async def body(request: web.Request, typ: type[T]) -> T:
    limit = request.app[RUNTIME].settings.http.max_body_bytes
    raw = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        raw += chunk
        if len(raw) > limit:
            raise ProblemError(
                413, "Payload too large", f"request body is over the limit of {limit} bytes"
            )
    if not raw:
        raise ProblemError(400, "Bad request", "a JSON body is required")
    try:
        return msgspec.json.decode(bytes(raw), type=typ)
    except msgspec.ValidationError as exc:
        raise ProblemError(400, "Invalid body", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ProblemError(400, "Invalid JSON", str(exc)) from None


def path_id(request: web.Request, name: str = "id") -> int:
    raw = request.match_info[name]
    if not raw.isdigit() or len(raw) > 18:
        raise ProblemError(404, "Not found", f"no such {name}: {raw!r}")
    return int(raw)


def list_query(
    request: web.Request, spec: ListSpec, forced: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    query = {k: request.query.getall(k) for k in request.query}
    try:
        lq = parse_list(spec, query, forced=forced)
    except ListError as exc:
        raise ProblemError(400, "Invalid list request", str(exc)) from None
    prefer = request.headers.get("Prefer", "")
    count = None
    for part in prefer.split(","):
        key, _, value = part.strip().partition("=")
        if key == "count" and value in ("exact", "estimated"):
            count = value
    return lq, count


def listed(page: Any, count: str | None) -> web.Response:
    headers = {"Preference-Applied": f"count={count}"} if count else None
    return reply(page, headers=headers)


async def ask(request: web.Request, actor: str, msg: Any) -> Any:
    rt = request.app[RUNTIME]
    return await rt.actor(actor).ask(msg, timeout=rt.settings.http.request_timeout)


def self_or_admin(who: Principal, user_id: int) -> None:
    if not who.is_admin and who.user_id != user_id:
        raise forbidden("only an admin acts on other users")


async def forget_user(request: web.Request, user_id: int) -> None:
    """Drop the cached user record after a write (tag user:<id>)."""
    try:
        await ask(request, "cache", CacheInvalidateTags("users", (f"user:{user_id}",)))
    except Exception as exc:  # the cache entry then lives out its short TTL
        log.warning("user_cache_invalidation_failed", user_id=user_id, error=repr(exc))


# -- users -----------------------------------------------------------------------------------------
@require("admin")
async def list_users(request: web.Request, who: Principal) -> web.Response:
    lq, count = list_query(request, USERS)
    return listed(await ask(request, "persistence", m.ListUsers(query=lq, count=count)), count)


@require()
async def get_user(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    return reply(await ask(request, "persistence", m.GetUser(user_id=user_id)))


@require("admin")
async def create_user(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    new = await body(request, UserCreate)
    user = await ask(request, "persistence", m.CreateUser(new=new))
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
    user = await ask(request, "persistence", m.UpdateUser(user_id=user_id, change=change))
    await forget_user(request, user_id)
    if change.disabled is True or change.password is not msgspec.UNSET:
        await ask(
            request, "sessions", SessionRevokeAll(user_id)
        )  # old sessions must not outlive the change
    return reply(user)


@require("admin")
async def delete_user(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    await ask(request, "persistence", m.DeleteUser(user_id=user_id))
    await forget_user(request, user_id)
    await ask(request, "sessions", SessionRevokeAll(user_id))
    return web.Response(status=204)


# -- tokens and sessions of a user ----------------------------------------------------------------------
@require()
async def list_tokens(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    await ask(request, "persistence", m.GetUser(user_id=user_id))  # 404 for an unknown user
    return reply(await ask(request, "persistence", m.ListTokens(user_id=user_id)))


@require()
async def create_token(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    new = await body(request, TokenCreate)
    return reply(await ask(request, "persistence", m.CreateToken(user_id=user_id, new=new)), 201)


@require()
async def revoke_token(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    token_id = path_id(request, "tokenId")
    return reply(
        await ask(request, "persistence", m.RevokeToken(token_id=token_id, user_id=user_id))
    )


@require()
async def list_user_sessions(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    return reply(await ask(request, "sessions", SessionList(user_id)))


@require()
async def revoke_user_sessions(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    user_id = path_id(request)
    self_or_admin(who, user_id)
    removed = await ask(request, "sessions", SessionRevokeAll(user_id))
    return reply({"revoked": removed})


# -- commands --------------------------------------------------------------------------------------------
def _sees_all(who: Principal) -> bool:
    return who.role in ("admin", "approver", "agent")


@require()
async def list_commands(request: web.Request, who: Principal) -> web.Response:
    forced = None if _sees_all(who) else {"user_id": who.user_id}
    lq, count = list_query(request, COMMANDS, forced)
    return listed(await ask(request, "persistence", m.ListCommands(query=lq, count=count)), count)


@require()
async def get_command(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    command = await ask(request, "persistence", m.GetCommand(command_id=path_id(request)))
    if not _sees_all(who) and command.user_id != who.user_id:
        raise ProblemError(404, "Not found", f"no command {command.id}")
    return reply(command)


@require()
async def create_command(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    new = await body(request, CommandCreate)
    user_id = new.user_id
    if who.role == "user":
        if user_id is not None and user_id != who.user_id:
            raise forbidden("a user creates commands only for themselves")
        user_id = who.user_id
    elif user_id is None:
        user_id = who.user_id
    command, created = await ask(request, "persistence", m.CreateCommand(new=new, user_id=user_id))
    return reply(command, 201 if created else 200, {"Location": f"/commands/{command.id}"})


@require("admin", "agent")
async def update_command(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    change = await body(request, CommandStatusUpdate)
    msg = m.UpdateCommandStatus(command_id=path_id(request), change=change, actor_id=who.user_id)
    return reply(await ask(request, "persistence", msg))


# -- approvals ----------------------------------------------------------------------------------------------
@require()
async def list_approvals(request: web.Request, who: Principal) -> web.Response:
    forced = None if _sees_all(who) else {"requester_id": who.user_id}
    lq, count = list_query(request, APPROVALS, forced)
    return listed(await ask(request, "persistence", m.ListApprovals(query=lq, count=count)), count)


@require()
async def get_approval(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    approval = await ask(request, "persistence", m.GetApproval(approval_id=path_id(request)))
    if not _sees_all(who) and approval.requester_id != who.user_id:
        raise ProblemError(404, "Not found", f"no approval request {approval.id}")
    return reply(approval)


@require()
async def create_approval(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    new = await body(request, ApprovalCreate)
    approval = await ask(
        request, "persistence", m.CreateApproval(new=new, requester_id=who.user_id)
    )
    return reply(approval, 201, {"Location": f"/approvals/{approval.id}"})


def _decide(decision: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    @require()
    async def decide(request: web.Request, who: Principal) -> web.Response:
        reject_unknown_params(request, ())
        reason = None
        if request.can_read_body:
            reason = (await body(request, Decision)).reason
        approval_id = path_id(request)
        if who.role == "user":  # users see only their own requests
            current = await ask(request, "persistence", m.GetApproval(approval_id=approval_id))
            if current.requester_id != who.user_id:
                raise ProblemError(404, "Not found", f"no approval request {approval_id}")
        msg = m.DecideApproval(
            approval_id=approval_id,
            decision=decision,  # type: ignore[arg-type]
            who=who,
            reason=reason,
        )
        return reply(await ask(request, "persistence", msg))

    decide.__name__ = f"{decision}_approval"
    return decide


# -- login sessions --------------------------------------------------------------------------------------------
class Login(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    username: str
    password: str


class LoginReply(msgspec.Struct, frozen=True, rename="camel"):
    token: str
    expires_at_ms: int
    user: User


async def login(request: web.Request) -> web.Response:
    """Password in, session token out. A session token presented with the
    request is rotated (same session, new id) rather than kept: no fixation."""
    reject_unknown_params(request, ())
    creds = await body(request, Login)
    who = await ask(
        request, "persistence", m.CheckPassword(username=creds.username, password=creds.password)
    )
    if who is None:
        raise ProblemError(401, "Unauthorized", "wrong username or password")
    user = await ask(request, "persistence", m.GetUser(user_id=who.user_id))
    presented = _session_token(request)
    session = None
    if presented is not None:
        try:
            current = await ask(request, "sessions", SessionGet(presented, touch=False))
            if current.user_id == user.id:
                session = await ask(request, "sessions", SessionRotate(presented))
            else:
                await ask(request, "sessions", SessionDelete(presented))
        except SessionNotFound:
            session = None
    if session is None:
        session = await ask(request, "sessions", SessionCreate(user.id, {"login": "password"}))
    return reply(LoginReply(token=session.id, expires_at_ms=session.expires_at_ms, user=user), 201)


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
        raise ProblemError(
            401, "Unauthorized", "log out with the session token as Authorization: Bearer"
        )
    if token.startswith(TOKEN_PREFIX):
        raise ProblemError(
            400, "Not a session", "API tokens are revoked with DELETE /users/{id}/tokens/{tokenId}"
        )
    if not await ask(request, "sessions", SessionDelete(token)):
        raise ProblemError(401, "Unauthorized", "invalid or expired session")
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
    ),
    RouteDoc(
        "POST", "/auth/logout", logout, "End the session given as the bearer token", status=204
    ),
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
    RouteDoc("GET", "/users/{id}/sessions", list_user_sessions, "List a user's sessions"),
    RouteDoc(
        "DELETE", "/users/{id}/sessions", revoke_user_sessions, "Revoke all of a user's sessions"
    ),
    RouteDoc(
        "GET",
        "/commands",
        list_commands,
        "List commands",
        response=Page[Command],
        list_spec=COMMANDS,
    ),
    RouteDoc(
        "POST",
        "/commands",
        create_command,
        "Create a command (idempotent on requestId)",
        CommandCreate,
        Command,
        201,
    ),
    RouteDoc("GET", "/commands/{id}", get_command, "Read a command", response=Command),
    RouteDoc(
        "PUT",
        "/commands/{id}",
        update_command,
        "Report a command's status",
        CommandStatusUpdate,
        Command,
    ),
    RouteDoc(
        "GET",
        "/approvals",
        list_approvals,
        "List approval requests",
        response=Page[Approval],
        list_spec=APPROVALS,
    ),
    RouteDoc(
        "POST", "/approvals", create_approval, "Request an approval", ApprovalCreate, Approval, 201
    ),
    RouteDoc("GET", "/approvals/{id}", get_approval, "Read an approval request", response=Approval),
    RouteDoc("PUT", "/approvals/{id}/approve", _decide("approved"), "Approve", Decision, Approval),
    RouteDoc(
        "PUT",
        "/approvals/{id}/reject",
        _decide("rejected"),
        "Reject (a reason is required)",
        Decision,
        Approval,
    ),
    RouteDoc("PUT", "/approvals/{id}/cancel", _decide("cancelled"), "Cancel", Decision, Approval),
]


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
