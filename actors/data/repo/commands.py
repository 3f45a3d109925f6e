"""Commands and their status transitions (DESIGN §4).

A status report (PUT /commands/{id}, the bus's command.* events) moves a
command only along running → succeeded | failed, or cancels it. The
approval statuses (awaiting_approval, approved, rejected, expired) are set by
the approval workflow alone (``approvals.py``): a report never decides one.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from actors.data.listing import ID_BOUNDS, Filter, ListQuery, ListSpec
from actors.data.model import (
    COMMAND_TRANSITIONS,
    STALE_REPORTS,
    Command,
    CommandCreate,
    CommandStatusUpdate,
    Page,
    Rating,
    risk_category,
)
from actors.data.repo.approvals import cancel_pending_for_command, insert_approval
from actors.data.repo.common import Conflict, Invalid, JsonPage, NotFound, json_page, page

# In the order of Command's fields: a listed row becomes a Command by position.
COMMAND_COLUMNS = (
    "id, request_id, user_id, source, type, action, parameters, description, status, risk_score, "
    "risk_category, result, error, created_at, started_at, finished_at, duration_ms, created_by, "
    "(SELECT a.id FROM approval_requests a WHERE a.command_id = commands.id ORDER BY a.id DESC LIMIT 1) "
    "AS approval_id, sender"
)
# What a status report may do: the target, and the statuses it may come from.
REPORTABLE: dict[str, frozenset[str]] = {
    target: COMMAND_TRANSITIONS[target]
    for target in ("running", "succeeded", "failed", "cancelled")
}


def _command(row: asyncpg.Record) -> Command:
    return Command(**dict(row))


def _listed(row: asyncpg.Record) -> Command:
    """A row of COMMAND_COLUMNS, by position (no dict a row: a page of fifty)."""
    return Command(*row)


def same_command(
    existing: Command,
    new: CommandCreate,
    user_id: int | None,
    created_by: int | None,
    same_parameters: bool,
) -> bool:
    """Whether ``new`` repeats ``existing`` (an idempotent retry) rather than
    reusing its requestId for something else: same creator, same user, same
    action and parameters (``same_parameters``: equal as PostgreSQL stores them)."""
    return (
        existing.created_by == created_by
        and existing.user_id == user_id
        and existing.action == new.action
        and same_parameters
    )


async def create_command(
    conn: asyncpg.Connection,
    new: CommandCreate,
    user_id: int | None,
    *,
    created_by: int | None,
    sender: str,
    threshold: int,
    expiry: int,
    rating: Rating,
) -> tuple[Command, bool]:
    """Insert a command (idempotent on the sender's request_id); at or above
    the approval threshold it waits for approval and gets an approval
    request, in the same transaction. Returns (command, created).
    ``created_by`` is the principal who asked (it may differ from ``user_id``,
    on whose behalf), ``sender`` whose requestId namespace it is; ``rating``
    its score and quorum (``rate``: the policy's, or the sender's higher score)."""
    score = rating.score
    category = risk_category(score)
    status = "awaiting_approval" if score >= threshold else "approved"
    request_id = new.request_id or f"api-{uuid.uuid4()}"
    async with conn.transaction():
        try:
            row = await conn.fetchrow(
                "INSERT INTO commands (request_id, user_id, source, type, action, parameters, description, "
                "status, risk_score, risk_category, created_by, sender) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
                "ON CONFLICT (sender, request_id) DO NOTHING RETURNING id",
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
                created_by,
                sender,
            )
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"no user {user_id}") from None
        if row is None:
            found = await conn.fetchrow(
                f"SELECT {COMMAND_COLUMNS}, parameters = $3::jsonb AS same_parameters "
                f"FROM commands WHERE sender = $1 AND request_id = $2",
                sender,
                request_id,
                new.parameters,
            )
            same = dict(found)
            same_parameters = bool(same.pop("same_parameters"))
            existing = Command(**same)
            if not same_command(existing, new, user_id, created_by, same_parameters):
                # The sender's own requestId, used before for something else.
                raise Conflict(
                    f"requestId {request_id!r} is already used by another of your commands"
                )
            return existing, False
        command_id = row["id"]
        await conn.execute(
            "INSERT INTO command_events (command_id, from_status, to_status, actor_id) VALUES ($1, NULL, $2, $3)",
            command_id,
            status,
            created_by,
        )
        if status == "awaiting_approval":
            await insert_approval(
                conn,
                command_id=command_id,
                requester_id=user_id,
                created_by=created_by,
                action=new.action,
                description=new.description,
                parameters=new.parameters,
                rating=rating,
                expires_in=expiry,
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


async def command_id_of(
    conn: asyncpg.Connection,
    sender: str,
    request_id: str | None,
    command_id: int | None,
    created_by: int | None = None,
) -> int:
    """The id of ``sender``'s command named by its requestId or id; another
    sender's command is not found, as if it did not exist. ``created_by``:
    the sender's user (an agent deleted and made again under its name is
    another sender)."""
    found = await conn.fetchval(
        "SELECT id FROM commands WHERE sender = $1 AND created_by IS NOT DISTINCT FROM $4 "
        "AND ($2::text IS NULL OR request_id = $2) AND ($3::bigint IS NULL OR id = $3)",
        sender,
        request_id,
        command_id,
        created_by,
    )
    if found is None:
        what = f"requestId {request_id!r}" if request_id is not None else f"id {command_id}"
        raise NotFound(f"no command of yours with {what}")
    return int(found)


async def update_command_status(
    conn: asyncpg.Connection,
    command_id: int,
    change: CommandStatusUpdate,
    actor_id: int | None,
    *,
    duration_ms: int | None = None,
    actor_name: str = "jarvisd",
) -> tuple[Command, str | None]:
    """Apply a status report; returns the command and the status it left
    (None when the report repeated the current status: a no-op). A finished
    command's duration is the agent's ``duration_ms`` if given, else the time
    since it started. Cancelling a command that awaits approval also cancels
    its pending approval request, in the same transaction."""
    target = change.status
    allowed = REPORTABLE.get(target)
    if allowed is None:
        raise Invalid(f"a status report cannot move a command to {target!r}")
    extra = ""
    if target == "running":
        extra = ", started_at = now()"
    elif target in ("succeeded", "failed"):
        # Started implicitly (reported straight from approved): it started
        # duration_ms before now, or now when the agent did not say.
        extra = (
            ", finished_at = now(), started_at = coalesce(c.started_at, "
            "now() - make_interval(secs => coalesce($6::bigint, 0) / 1000.0)), "
            "duration_ms = coalesce($6::bigint, "
            "(extract(epoch FROM now() - coalesce(c.started_at, now())) * 1000)::bigint)"
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
            *((duration_ms,) if target in ("succeeded", "failed") else ()),
        )
        if row is None:
            current = await conn.fetchrow(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1", command_id
            )
            if current is None:
                raise NotFound(f"no command {command_id}")
            if current["status"] == target or current["status"] in STALE_REPORTS.get(target, ()):
                return _command(current), None  # a repeated or late report: no-op
            raise Conflict(
                f"command {command_id} is {current['status']}; it cannot become {target}",
                _command(current),
            )
        reason = change.reason or change.error
        previous = row["previous"]
        if previous == "approved" and target in ("succeeded", "failed"):
            await conn.execute(
                "INSERT INTO command_events (command_id, from_status, to_status, actor_id, reason) "
                "VALUES ($1, 'approved', 'running', $2, 'started implicitly: reported finished')",
                command_id,
                actor_id,
            )
            previous = "running"
        await conn.execute(
            "INSERT INTO command_events (command_id, from_status, to_status, actor_id, reason) "
            "VALUES ($1, $2, $3, $4, $5)",
            command_id,
            previous,
            target,
            actor_id,
            reason,
        )
        if target == "cancelled" and row["previous"] == "awaiting_approval":
            await cancel_pending_for_command(conn, command_id, actor_id, reason, actor_name)
        updated = await conn.fetchrow(
            f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1", command_id
        )
    return _command(updated), str(row["previous"])


_COMMAND_STATUSES = frozenset(COMMAND_TRANSITIONS) | {"pending"}
CATEGORIES = frozenset({"LOW", "MEDIUM", "HIGH", "CRITICAL"})

COMMANDS = ListSpec(
    table="commands",
    columns=COMMAND_COLUMNS,
    filters={
        "userId": Filter("user_id", "eq", int, bounds=ID_BOUNDS),
        "requestId": Filter("request_id", "eq"),
        "sender": Filter("sender", "eq"),
        "status": Filter("status", "in", choices=_COMMAND_STATUSES),
        "type": Filter(
            "type", "in", choices=frozenset({"voice", "text", "api", "scheduled", "agent"})
        ),
        "action": Filter("action", "eq"),
        "riskCategory": Filter("risk_category", "in", choices=CATEGORIES),
        "riskScoreMin": Filter("risk_score", "min", int, bounds=(0, 100)),
        "riskScoreMax": Filter("risk_score", "max", int, bounds=(0, 100)),
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


async def list_commands(
    conn: asyncpg.Connection, lq: ListQuery, count: str | None, *, as_json: bool = False
) -> Page[Command] | JsonPage:
    if as_json:
        return await json_page(conn, COMMANDS, lq, Command, count)
    return await page(conn, COMMANDS, lq, _listed, count)
