"""SQL for users, tokens, commands and approvals (DESIGN §4).

Every status change is one conditional ``UPDATE … WHERE status = ANY(allowed)
RETURNING`` with its audit event in the same transaction: a repeated event is
a no-op, a conflicting one raises Conflict, nothing is applied twice.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from actors.data import credentials
from actors.data.listing import Filter, ListQuery, ListSpec, count_sql, encode_cursor, select_sql
from actors.data.model import (
    COMMAND_TRANSITIONS,
    Approval,
    ApprovalCreate,
    Command,
    CommandCreate,
    CommandStatusUpdate,
    Page,
    Principal,
    Token,
    TokenCreate,
    TokenCreated,
    User,
    UserCreate,
    UserUpdate,
    parameters_digest,
    risk_category,
)

__all__ = ["Conflict", "Forbidden", "Invalid", "NotFound"]


class NotFound(LookupError):
    pass


class Conflict(Exception):
    """The change conflicts with the current state (HTTP 409)."""

    def __init__(self, message: str, current: Any = None) -> None:
        super().__init__(message)
        self.current = current


class Forbidden(PermissionError):
    """Allowed to ask, but not this (HTTP 403)."""


class Invalid(ValueError):
    """Input that passed the schema but not the rules (HTTP 400)."""


USER_COLUMNS = (
    "id, username, email, role, preferences, disabled, created_at, updated_at, last_login_at"
)
TOKEN_COLUMNS = (
    "id, user_id, name, prefix, scopes, created_at, last_used_at, expires_at, revoked_at"  # noqa: S105
)
COMMAND_COLUMNS = (
    "id, request_id, user_id, source, type, action, parameters, description, status, risk_score, "
    "risk_category, result, error, created_at, started_at, finished_at, duration_ms, "
    "(SELECT a.id FROM approval_requests a WHERE a.command_id = commands.id ORDER BY a.id DESC LIMIT 1) "
    "AS approval_id"
)
APPROVAL_COLUMNS = (
    "id, command_id, requester_id, action, description, parameters_digest, risk_score, risk_category, "
    "status, expires_at, decided_by, decided_at, reason, created_at"
)


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb in and out as Python objects."""
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: msgspec.json.encode(v).decode(),
        decoder=json.loads,
        schema="pg_catalog",
    )


def _user(row: asyncpg.Record) -> User:
    return User(**dict(row))


def _token(row: asyncpg.Record) -> Token:
    data = dict(row)
    data["scopes"] = list(data["scopes"])
    return Token(**data)


def _command(row: asyncpg.Record) -> Command:
    return Command(**dict(row))


def _approval(row: asyncpg.Record) -> Approval:
    data = dict(row)
    data.pop("lapsed", None)  # a helper column of decide_approval
    return Approval(**data)


async def _page(
    conn: asyncpg.Connection, spec: ListSpec, lq: ListQuery, make: Any, count: str | None
) -> Page[Any]:
    sql, args = select_sql(spec, lq)
    rows = await conn.fetch(sql, *args)
    more = len(rows) > lq.limit
    rows = rows[: lq.limit]
    next_cursor = None
    if more and rows:
        column = spec.orders[lq.order.lstrip("-")][0]
        next_cursor = encode_cursor(lq.order, rows[-1][column], rows[-1]["id"])
    total = None
    if count in ("exact", "estimated"):
        csql, cargs = count_sql(spec, lq, estimated=count == "estimated")
        value = await conn.fetchval(csql, *cargs)
        total = int(value) if count == "exact" else int(json.loads(value)[0]["Plan"]["Plan Rows"])
    return Page(items=[make(r) for r in rows], next_cursor=next_cursor, count=total)


# -- users -------------------------------------------------------------------------------------
async def create_user(conn: asyncpg.Connection, new: UserCreate, password_hash: str | None) -> User:
    try:
        row = await conn.fetchrow(
            f"INSERT INTO users (username, email, password_hash, role, preferences) VALUES ($1, $2, $3, $4, $5) "
            f"RETURNING {USER_COLUMNS}",
            new.username,
            new.email,
            password_hash,
            new.role,
            new.preferences,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"username {new.username!r} is taken") from None
    return _user(row)


async def get_user(conn: asyncpg.Connection, user_id: int) -> User:
    row = await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id)
    if row is None:
        raise NotFound(f"no user {user_id}")
    return _user(row)


async def get_user_by_name(conn: asyncpg.Connection, username: str) -> User:
    row = await conn.fetchrow(
        f"SELECT {USER_COLUMNS} FROM users WHERE lower(username) = lower($1)", username
    )
    if row is None:
        raise NotFound(f"no user {username!r}")
    return _user(row)


async def update_user(
    conn: asyncpg.Connection, user_id: int, change: UserUpdate, password_hash: str | None
) -> User:
    sets: list[str] = []
    args: list[Any] = [user_id]
    for field in ("email", "role", "preferences", "disabled"):
        value = getattr(change, field)
        if value is not msgspec.UNSET:
            args.append(value)
            sets.append(f"{field} = ${len(args)}")
    if password_hash is not None:
        args.append(password_hash)
        sets.append(f"password_hash = ${len(args)}")
    if not sets:
        return await get_user(conn, user_id)
    async with conn.transaction():
        row = await conn.fetchrow(
            f"UPDATE users SET {', '.join(sets)}, updated_at = now() WHERE id = $1 RETURNING {USER_COLUMNS}",
            *args,
        )
        if row is None:
            raise NotFound(f"no user {user_id}")
        if change.role is not msgspec.UNSET or change.disabled is not msgspec.UNSET:
            await _keep_an_admin(conn)
    return _user(row)


async def _keep_an_admin(conn: asyncpg.Connection) -> None:
    admins = await conn.fetchval("SELECT count(*) FROM users WHERE role = 'admin' AND NOT disabled")
    if admins == 0:
        raise Conflict("that would leave no enabled admin")


async def delete_user(conn: asyncpg.Connection, user_id: int) -> None:
    async with conn.transaction():
        done = await conn.fetchval("DELETE FROM users WHERE id = $1 RETURNING id", user_id)
        if done is None:
            raise NotFound(f"no user {user_id}")
        await _keep_an_admin(conn)


async def password_hash_of(
    conn: asyncpg.Connection, username: str
) -> tuple[User, str | None] | None:
    row = await conn.fetchrow(
        f"SELECT {USER_COLUMNS}, password_hash FROM users WHERE lower(username) = lower($1)",
        username,
    )
    if row is None:
        return None
    data = dict(row)
    stored = data.pop("password_hash")
    return User(**data), stored


async def record_login(conn: asyncpg.Connection, user_id: int) -> None:
    await conn.execute("UPDATE users SET last_login_at = now() WHERE id = $1", user_id)


async def has_admin(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE role = 'admin')"))


# -- tokens ------------------------------------------------------------------------------------
async def create_token(conn: asyncpg.Connection, user_id: int, new: TokenCreate) -> TokenCreated:
    token = credentials.new_token()
    expires = (
        None
        if new.expires_in is None
        else datetime.now().astimezone() + timedelta(seconds=new.expires_in)
    )
    try:
        row = await conn.fetchrow(
            f"INSERT INTO api_tokens (user_id, name, token_hash, prefix, scopes, expires_at) "
            f"VALUES ($1, $2, $3, $4, $5, $6) RETURNING {TOKEN_COLUMNS}",
            user_id,
            new.name,
            credentials.hash_token(token),
            credentials.token_display_prefix(token),
            list(new.scopes),
            expires,
        )
    except asyncpg.ForeignKeyViolationError:
        raise NotFound(f"no user {user_id}") from None
    return TokenCreated(token=token, info=_token(row))


async def list_tokens(conn: asyncpg.Connection, user_id: int) -> list[Token]:
    rows = await conn.fetch(
        f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE user_id = $1 ORDER BY id", user_id
    )
    return [_token(r) for r in rows]


async def revoke_token(conn: asyncpg.Connection, user_id: int | None, token_id: int) -> Token:
    row = await conn.fetchrow(
        f"UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) "
        f"WHERE id = $1 AND ($2::bigint IS NULL OR user_id = $2) RETURNING {TOKEN_COLUMNS}",
        token_id,
        user_id,
    )
    if row is None:
        raise NotFound(f"no token {token_id}")
    return _token(row)


async def authenticate_token(conn: asyncpg.Connection, token: str) -> Principal | None:
    """The token's user, if the token is live and the user enabled. Touches
    last_used_at at most once a minute, so reads stay reads."""
    row = await conn.fetchrow(
        "SELECT t.id AS token_id, u.id, u.username, u.role, "
        "t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute' AS stale "
        "FROM api_tokens t JOIN users u ON u.id = t.user_id "
        "WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now()) "
        "AND NOT u.disabled",
        credentials.hash_token(token),
    )
    if row is None:
        return None
    if row["stale"]:  # one write a minute per token, not one per request
        await conn.execute(
            "UPDATE api_tokens SET last_used_at = now() WHERE id = $1", row["token_id"]
        )
    return Principal(
        user_id=row["id"],
        role=row["role"],
        name=row["username"],
        via="token",
        token_id=row["token_id"],
    )


# -- commands ----------------------------------------------------------------------------------
async def create_command(
    conn: asyncpg.Connection,
    new: CommandCreate,
    user_id: int | None,
    *,
    threshold: int,
    expiry: int,
    policy_score: int = 0,
) -> tuple[Command, bool]:
    """Insert a command (idempotent on request_id); at or above the approval
    threshold it waits for approval and gets an approval request, in the same
    transaction. Returns (command, created)."""
    score = max(policy_score, new.risk_score or 0)
    category = risk_category(score)
    status = "awaiting_approval" if score >= threshold else "approved"
    request_id = new.request_id or f"api-{uuid.uuid4()}"
    async with conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO commands (request_id, user_id, source, type, action, parameters, description, status, "
            "risk_score, risk_category) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
            "ON CONFLICT (request_id) DO NOTHING RETURNING id",
            request_id,
            user_id,
            new.source,
            new.type,
            new.action,
            new.parameters,
            new.description,
            status,
            score,
            category,
        )
        if row is None:
            existing = await conn.fetchrow(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE request_id = $1", request_id
            )
            return _command(existing), False
        command_id = row["id"]
        await conn.execute(
            "INSERT INTO command_events (command_id, from_status, to_status, actor_id) VALUES ($1, NULL, $2, $3)",
            command_id,
            status,
            user_id,
        )
        if status == "awaiting_approval":
            await _insert_approval(
                conn,
                command_id,
                user_id,
                new.action,
                new.description,
                new.parameters,
                score,
                expiry,
            )
        created = await conn.fetchrow(
            f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1", command_id
        )
    return _command(created), True


async def get_command(conn: asyncpg.Connection, command_id: int) -> Command:
    row = await conn.fetchrow(f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1", command_id)
    if row is None:
        raise NotFound(f"no command {command_id}")
    return _command(row)


async def update_command_status(
    conn: asyncpg.Connection, command_id: int, change: CommandStatusUpdate, actor_id: int | None
) -> Command:
    target = change.status
    allowed = COMMAND_TRANSITIONS.get(target)
    if allowed is None:
        raise Invalid(f"a command cannot be moved to {target!r}")
    extra = ""
    if target == "running":
        extra = ", started_at = now()"
    elif target in ("succeeded", "failed"):
        extra = (
            ", finished_at = now(), duration_ms = "
            "(extract(epoch FROM now() - coalesce(started_at, created_at)) * 1000)::bigint"
        )
    async with conn.transaction():
        row = await conn.fetchrow(
            f"WITH old AS (SELECT status FROM commands WHERE id = $1 FOR UPDATE) "
            f"UPDATE commands c SET status = $2, result = coalesce($3, c.result), error = coalesce($4, c.error)"
            f"{extra} FROM old WHERE c.id = $1 AND old.status = ANY($5::text[]) RETURNING old.status AS previous",
            command_id,
            target,
            change.result,
            change.error,
            list(allowed),
        )
        if row is None:
            current = await conn.fetchrow(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1", command_id
            )
            if current is None:
                raise NotFound(f"no command {command_id}")
            if current["status"] == target:
                return _command(current)  # a repeated report: no-op
            raise Conflict(
                f"command {command_id} is {current['status']}; it cannot become {target}",
                _command(current),
            )
        await conn.execute(
            "INSERT INTO command_events (command_id, from_status, to_status, actor_id, reason) "
            "VALUES ($1, $2, $3, $4, $5)",
            command_id,
            row["previous"],
            target,
            actor_id,
            change.reason or change.error,
        )
        updated = await conn.fetchrow(
            f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1", command_id
        )
    return _command(updated)


async def insert_commands_batch(
    conn: asyncpg.Connection,
    rows: list[CommandCreate],
    user_ids: list[int | None],
    *,
    threshold: int,
) -> list[tuple[str, int | None, bool]]:
    """Many commands in one round trip, idempotent on request_id.
    Returns (request_id, id, new) per row; ``id`` is None for a duplicate
    within the batch that lost to an earlier row."""
    request_ids = [r.request_id or f"api-{uuid.uuid4()}" for r in rows]
    scores = [r.risk_score or 0 for r in rows]
    inserted = await conn.fetch(
        "INSERT INTO commands (request_id, user_id, source, type, action, parameters, description, status, "
        "risk_score, risk_category) "
        "SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::jsonb[], "
        "$7::text[], $8::text[], $9::smallint[], $10::text[]) "
        "ON CONFLICT (request_id) DO NOTHING RETURNING id, request_id",
        request_ids,
        user_ids,
        [r.source for r in rows],
        [r.type for r in rows],
        [r.action for r in rows],
        [r.parameters for r in rows],
        [r.description for r in rows],
        ["awaiting_approval" if s >= threshold else "approved" for s in scores],
        scores,
        [risk_category(s) for s in scores],
    )
    new = {r["request_id"]: r["id"] for r in inserted}
    missing = [rid for rid in request_ids if rid not in new]
    existing: dict[str, int] = {}
    if missing:
        for r in await conn.fetch(
            "SELECT id, request_id FROM commands WHERE request_id = ANY($1::text[])", missing
        ):
            existing[r["request_id"]] = r["id"]
    return [(rid, new.get(rid, existing.get(rid)), rid in new) for rid in request_ids]


# -- approvals ---------------------------------------------------------------------------------
async def create_approval(
    conn: asyncpg.Connection, new: ApprovalCreate, requester_id: int | None, *, expiry: int
) -> Approval:
    seconds = new.expires_in or expiry
    async with conn.transaction():
        if new.command_id is not None:
            moved = await conn.fetchval(
                "UPDATE commands SET status = 'awaiting_approval' WHERE id = $1 AND status = 'pending' RETURNING id",
                new.command_id,
            )
            if moved is None:
                status = await conn.fetchval(
                    "SELECT status FROM commands WHERE id = $1", new.command_id
                )
                if status is None:
                    raise NotFound(f"no command {new.command_id}")
                if status != "awaiting_approval":
                    raise Conflict(
                        f"command {new.command_id} is {status}; only a pending command can ask for approval"
                    )
            else:
                await conn.execute(
                    "INSERT INTO command_events (command_id, from_status, to_status, actor_id) "
                    "VALUES ($1, 'pending', 'awaiting_approval', $2)",
                    new.command_id,
                    requester_id,
                )
        row = await _insert_approval(
            conn,
            new.command_id,
            requester_id,
            new.action,
            new.description,
            new.parameters,
            new.risk_score,
            seconds,
        )
    return _approval(row)


async def _insert_approval(
    conn: asyncpg.Connection,
    command_id: int | None,
    requester_id: int | None,
    action: str,
    description: str,
    parameters: Any,
    score: int,
    expires_in: int,
) -> asyncpg.Record:
    """A pending approval request bound to the parameters' digest, with its audit event."""
    row = await conn.fetchrow(
        f"INSERT INTO approval_requests (command_id, requester_id, action, description, parameters_digest, "
        f"risk_score, risk_category, status, expires_at) "
        f"VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', now() + make_interval(secs => $8)) "
        f"RETURNING {APPROVAL_COLUMNS}",
        command_id,
        requester_id,
        action,
        description,
        parameters_digest(parameters),
        score,
        risk_category(score),
        expires_in,
    )
    await conn.execute(
        "INSERT INTO approval_events (approval_id, from_status, to_status, actor_id) VALUES ($1, NULL, 'pending', $2)",
        row["id"],
        requester_id,
    )
    return row


async def get_approval(conn: asyncpg.Connection, approval_id: int) -> Approval:
    row = await conn.fetchrow(
        f"SELECT {APPROVAL_COLUMNS} FROM approval_requests WHERE id = $1", approval_id
    )
    if row is None:
        raise NotFound(f"no approval request {approval_id}")
    return _approval(row)


async def decide_approval(
    conn: asyncpg.Connection, approval_id: int, decision: str, who: Principal, reason: str | None
) -> Approval:
    """approved | rejected | cancelled, with the rules of DESIGN §6 checked
    against the row as it is when the decision lands."""
    if decision == "rejected" and not reason:
        raise Invalid("a rejection needs a reason")
    async with conn.transaction():
        current = await conn.fetchrow(
            f"SELECT {APPROVAL_COLUMNS}, expires_at <= now() AS lapsed FROM approval_requests WHERE id = $1 FOR UPDATE",
            approval_id,
        )
        if current is None:
            raise NotFound(f"no approval request {approval_id}")
        if decision in ("approved", "rejected"):
            if who.role not in ("admin", "approver"):
                raise Forbidden("only approvers and admins decide approval requests")
            if who.user_id is not None and who.user_id == current["requester_id"]:
                raise Forbidden("nobody approves or rejects their own request")
            if current["risk_category"] == "CRITICAL" and not who.is_admin:
                raise Forbidden("a CRITICAL request needs an admin")
        elif decision == "cancelled":
            if not who.is_admin and who.user_id != current["requester_id"]:
                raise Forbidden("only the requester or an admin cancels a request")
        else:
            raise Invalid(f"unknown decision {decision!r}")
        if current["status"] == "pending" and current["lapsed"]:
            await _set_approval(conn, current, "expired", None, "expired before a decision")
            raise Conflict(
                f"approval request {approval_id} expired", await get_approval(conn, approval_id)
            )
        if current["status"] == decision:
            return _approval(current)  # the same decision again: no-op
        if current["status"] != "pending":
            raise Conflict(
                f"approval request {approval_id} is already {current['status']}", _approval(current)
            )
        await _set_approval(conn, current, decision, who.user_id, reason)
        return await get_approval(conn, approval_id)


async def _set_approval(
    conn: asyncpg.Connection,
    current: asyncpg.Record,
    status: str,
    actor_id: int | None,
    reason: str | None,
) -> None:
    await conn.execute(
        "UPDATE approval_requests SET status = $2, decided_by = $3, decided_at = now(), reason = $4 "
        "WHERE id = $1 AND status = 'pending'",
        current["id"],
        status,
        actor_id,
        reason,
    )
    await conn.execute(
        "INSERT INTO approval_events (approval_id, from_status, to_status, actor_id, reason) "
        "VALUES ($1, 'pending', $2, $3, $4)",
        current["id"],
        status,
        actor_id,
        reason,
    )
    if current["command_id"] is not None:
        moved = await conn.fetchval(
            "UPDATE commands SET status = $2 WHERE id = $1 AND status = 'awaiting_approval' RETURNING id",
            current["command_id"],
            status,
        )
        if moved is not None:
            await conn.execute(
                "INSERT INTO command_events (command_id, from_status, to_status, actor_id, reason) "
                "VALUES ($1, 'awaiting_approval', $2, $3, $4)",
                current["command_id"],
                status,
                actor_id,
                reason,
            )


# -- lists ---------------------------------------------------------------------------------------
_COMMAND_STATUSES = frozenset(COMMAND_TRANSITIONS) | {"pending"}
_CATEGORIES = frozenset({"LOW", "MEDIUM", "HIGH", "CRITICAL"})

USERS = ListSpec(
    table="users",
    columns=USER_COLUMNS,
    filters={
        "role": Filter("role", "in", choices=frozenset({"admin", "approver", "user", "agent"})),
        "disabled": Filter("disabled", "bool", bool),
        "q": Filter("username || ' ' || coalesce(email, '')", "like"),
    },
    orders={
        "createdAt": ("created_at", datetime),
        "username": ("username", str),
        "id": ("id", int),
    },
    default_order="id",
)

COMMANDS = ListSpec(
    table="commands",
    columns=COMMAND_COLUMNS,
    filters={
        "userId": Filter("user_id", "eq", int),
        "status": Filter("status", "in", choices=_COMMAND_STATUSES),
        "type": Filter(
            "type", "in", choices=frozenset({"voice", "text", "api", "scheduled", "agent"})
        ),
        "action": Filter("action", "eq"),
        "riskCategory": Filter("risk_category", "in", choices=_CATEGORIES),
        "riskScoreMin": Filter("risk_score", "min", int),
        "riskScoreMax": Filter("risk_score", "max", int),
        "createdAfter": Filter("created_at", "min", datetime),
        "createdBefore": Filter("created_at", "max", datetime),
        "q": Filter("search", "fts"),
    },
    orders={
        "createdAt": ("created_at", datetime),
        "riskScore": ("risk_score", int),
        "id": ("id", int),
    },
)

APPROVALS = ListSpec(
    table="approval_requests",
    columns=APPROVAL_COLUMNS,
    filters={
        "status": Filter(
            "status",
            "in",
            choices=frozenset({"pending", "approved", "rejected", "expired", "cancelled"}),
        ),
        "riskCategory": Filter("risk_category", "in", choices=_CATEGORIES),
        "requesterId": Filter("requester_id", "eq", int),
        "commandId": Filter("command_id", "eq", int),
        "createdAfter": Filter("created_at", "min", datetime),
        "createdBefore": Filter("created_at", "max", datetime),
        "q": Filter("search", "fts"),
    },
    orders={
        "createdAt": ("created_at", datetime),
        "riskScore": ("risk_score", int),
        "id": ("id", int),
    },
)


async def list_users(conn: asyncpg.Connection, lq: ListQuery, count: str | None) -> Page[User]:
    return await _page(conn, USERS, lq, _user, count)


async def list_commands(
    conn: asyncpg.Connection, lq: ListQuery, count: str | None
) -> Page[Command]:
    return await _page(conn, COMMANDS, lq, _command, count)


async def list_approvals(
    conn: asyncpg.Connection, lq: ListQuery, count: str | None
) -> Page[Approval]:
    return await _page(conn, APPROVALS, lq, _approval, count)
