"""Approval requests and their decisions (DESIGN §6).

- A command's approval request is the one created with it (``insert_approval``
  from ``commands.create_command``), bound to the digest of its parameters.
  A standalone request (POST /approvals) never refers to a command.
- Deciding is one conditional transition under a row lock, with the rules
  checked against the row as it is when the decision lands: approvers and
  admins decide; nobody decides a request they asked for or created; a
  CRITICAL request needs an admin; a command moves only when its own request
  is approved and its parameters still match the digest.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from actors.data.listing import ID_BOUNDS, Filter, ListQuery, ListSpec
from actors.data.model import (
    Approval,
    ApprovalCreate,
    Page,
    Principal,
    digest_sql,
    risk_category,
)
from actors.data.repo.common import (
    Conflict,
    Expired,
    Forbidden,
    Invalid,
    JsonPage,
    NotFound,
    json_page,
    page,
)

APPROVAL_COLUMNS = (
    "id, command_id, requester_id, action, description, parameters_digest, risk_score, risk_category, "
    "status, expires_at, decided_by, decider, decided_at, reason, created_at, created_by"
)


def _approval(row: asyncpg.Record) -> Approval:
    data = dict(row)
    data.pop("lapsed", None)  # a helper column of decide_approval
    data.pop("request_id", None)  # and of warn_due
    data.pop("sender", None)
    return Approval(**data)


async def create_approval(
    conn: asyncpg.Connection,
    new: ApprovalCreate,
    requester_id: int | None,
    *,
    expires_in: int,
    score: int,
) -> Approval:
    """A standalone request by ``requester_id`` (who is also its creator),
    scored ``score`` (the policy's, or the requester's if higher)."""
    async with conn.transaction():
        row = await insert_approval(
            conn,
            command_id=None,
            requester_id=requester_id,
            created_by=requester_id,
            action=new.action,
            description=new.description,
            parameters=new.parameters,
            score=score,
            expires_in=expires_in,
        )
    return _approval(row)


async def insert_approval(
    conn: asyncpg.Connection,
    *,
    command_id: int | None,
    requester_id: int | None,
    created_by: int | None,
    action: str,
    description: str,
    parameters: Any,
    score: int,
    expires_in: int,
) -> asyncpg.Record:
    """A pending approval request bound to the parameters' digest, with its audit event."""
    row = await conn.fetchrow(
        f"INSERT INTO approval_requests (command_id, requester_id, created_by, action, description, "
        f"parameters_digest, risk_score, risk_category, status, expires_at) "
        f"VALUES ($1, $2, $3, $4, $5, {digest_sql('$6::jsonb')}, $7, $8, 'pending', "
        f"now() + make_interval(secs => $9)) "
        f"RETURNING {APPROVAL_COLUMNS}",
        command_id,
        requester_id,
        created_by,
        action,
        description,
        parameters,
        score,
        risk_category(score),
        expires_in,
    )
    await conn.execute(
        "INSERT INTO approval_events (approval_id, from_status, to_status, actor_id) VALUES ($1, NULL, 'pending', $2)",
        row["id"],
        created_by,
    )
    return row


async def get_approval(conn: asyncpg.Connection, approval_id: int) -> Approval:
    row = await conn.fetchrow(
        f"SELECT {APPROVAL_COLUMNS} FROM approval_requests WHERE id = $1", approval_id
    )
    if row is None:
        raise NotFound(f"no approval request {approval_id}")
    return _approval(row)


def _check_decider(current: asyncpg.Record, decision: str, who: Principal) -> None:
    own = who.user_id is not None and who.user_id in (
        current["requester_id"],
        current["created_by"],
    )
    if decision in ("approved", "rejected"):
        if who.role not in ("admin", "approver"):
            raise Forbidden("only approvers and admins decide approval requests")
        if own:
            raise Forbidden("nobody approves or rejects a request they asked for or created")
        if current["risk_category"] == "CRITICAL" and not who.is_admin:
            raise Forbidden("a CRITICAL request needs an admin")
    elif decision == "cancelled":
        if not who.is_admin and not own:
            raise Forbidden("only the requester, its creator or an admin cancels a request")
    else:
        raise Invalid(f"unknown decision {decision!r}")


async def decide_approval(
    conn: asyncpg.Connection, approval_id: int, decision: str, who: Principal, reason: str | None
) -> Approval:
    """approved | rejected | cancelled, checked against the row as it is when
    the decision lands; returns the decided request. A request
    no longer pending is a Conflict, whoever decided it and however (even
    the same decision again, so that of two deciders racing exactly one
    succeeds); one found past its deadline is expired (and that is
    committed) instead of decided: Expired."""
    if decision == "rejected" and not reason:
        raise Invalid("a rejection needs a reason")
    lapsed = False
    async with conn.transaction():
        # Locks are taken command first, then request, as a status report does
        # (cancelling a waiting command cancels its request): never a deadlock.
        command_id = await conn.fetchval(
            "SELECT command_id FROM approval_requests WHERE id = $1", approval_id
        )
        if command_id is not None:
            await conn.execute("SELECT 1 FROM commands WHERE id = $1 FOR UPDATE", command_id)
        current = await conn.fetchrow(
            f"SELECT {APPROVAL_COLUMNS}, expires_at <= now() AS lapsed FROM approval_requests "
            f"WHERE id = $1 FOR UPDATE",
            approval_id,
        )
        if current is None:
            raise NotFound(f"no approval request {approval_id}")
        _check_decider(current, decision, who)
        if current["status"] == "pending" and current["lapsed"]:
            await set_status(conn, current, "expired", None, "expired before a decision", "jarvisd")
            lapsed = True
        elif current["status"] != "pending":
            raise Conflict(
                f"approval request {approval_id} is already {current['status']}", _approval(current)
            )
        else:
            if decision == "approved" and current["command_id"] is not None:
                await _check_bound_command(conn, current)
            await set_status(conn, current, decision, who.user_id, reason, who.name)
    decided = await get_approval(conn, approval_id)
    if lapsed:
        raise Expired(f"approval request {approval_id} expired", decided)
    return decided


async def _check_bound_command(conn: asyncpg.Connection, current: asyncpg.Record) -> None:
    """An approval moves only the command it was created for, with the
    parameters it was created for."""
    command = await conn.fetchrow(
        f"SELECT status, {digest_sql('parameters')} AS digest, "
        f"(SELECT max(a.id) FROM approval_requests a WHERE a.command_id = c.id) AS approval_id "
        f"FROM commands c WHERE id = $1 FOR UPDATE",
        current["command_id"],
    )
    if command is None:
        return  # the command was deleted with its user: the request is decided alone
    if command["approval_id"] != current["id"]:
        raise Conflict(f"approval request {current['id']} is not the command's current request")
    if command["digest"] != current["parameters_digest"]:
        raise Conflict(
            f"command {current['command_id']} changed since approval request {current['id']}"
        )


async def set_status(
    conn: asyncpg.Connection,
    current: asyncpg.Record,
    status: str,
    actor_id: int | None,
    reason: str | None,
    decider: str,
) -> None:
    """pending → ``status`` for the request and, if it has one, its command."""
    await conn.execute(
        "UPDATE approval_requests SET status = $2, decided_by = $3, decided_at = now(), reason = $4, "
        "decider = $5 WHERE id = $1 AND status = 'pending'",
        current["id"],
        status,
        actor_id,
        reason,
        decider,
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


async def cancel_pending_for_command(
    conn: asyncpg.Connection,
    command_id: int,
    actor_id: int | None,
    reason: str | None,
    decider: str,
) -> None:
    """The command was cancelled while it waited: so is its pending request
    (the command itself has already moved)."""
    rows = await conn.fetch(
        "UPDATE approval_requests SET status = 'cancelled', decided_by = $2, decided_at = now(), "
        "reason = $3, decider = $4 WHERE command_id = $1 AND status = 'pending' RETURNING id",
        command_id,
        actor_id,
        reason or "the command was cancelled",
        decider,
    )
    for row in rows:
        await conn.execute(
            "INSERT INTO approval_events (approval_id, from_status, to_status, actor_id, reason) "
            "VALUES ($1, 'pending', 'cancelled', $2, $3)",
            row["id"],
            actor_id,
            reason or "the command was cancelled",
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
        "riskCategory": Filter(
            "risk_category", "in", choices=frozenset({"LOW", "MEDIUM", "HIGH", "CRITICAL"})
        ),
        "requesterId": Filter("requester_id", "eq", int, bounds=ID_BOUNDS),
        "commandId": Filter("command_id", "eq", int, bounds=ID_BOUNDS),
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


async def list_approvals(
    conn: asyncpg.Connection, lq: ListQuery, count: str | None, *, as_json: bool = False
) -> Page[Approval] | JsonPage:
    if as_json:
        return await json_page(conn, APPROVALS, lq, Approval, count)
    return await page(conn, APPROVALS, lq, _approval, count)


async def warn_due(
    conn: asyncpg.Connection, warn_before: float, limit: int
) -> list[tuple[Approval, tuple[str, str] | None]]:
    """Pending requests entering their last stretch (``warn_before`` seconds,
    or the last quarter of a shorter lifetime), marked as warned so that each
    is returned once; with their command's (request id, sender)."""
    rows = await conn.fetch(
        f"UPDATE approval_requests SET warned_at = now() WHERE id IN ("
        f"SELECT id FROM approval_requests WHERE status = 'pending' AND warned_at IS NULL "
        f"AND expires_at > now() AND expires_at - LEAST(make_interval(secs => $1), "
        f"(expires_at - created_at) / 4) <= now() ORDER BY expires_at LIMIT $2 "
        f"FOR UPDATE SKIP LOCKED) RETURNING {APPROVAL_COLUMNS}, "
        f"(SELECT request_id FROM commands c WHERE c.id = command_id) AS request_id, "
        f"(SELECT sender FROM commands c WHERE c.id = command_id) AS sender",
        warn_before,
        limit,
    )
    return [
        (_approval(r), None if r["request_id"] is None else (r["request_id"], r["sender"]))
        for r in rows
    ]


async def expire_due(conn: asyncpg.Connection, limit: int) -> list[Approval]:
    """Pending requests past their deadline, expired (their commands too),
    each in a transaction of its own, locks taken command first as a decision
    takes them. A request decided meanwhile is left as it is."""
    due = await conn.fetch(
        "SELECT id, command_id FROM approval_requests WHERE status = 'pending' "
        "AND expires_at <= now() ORDER BY expires_at LIMIT $1",
        limit,
    )
    expired: list[Approval] = []
    for row in due:
        async with conn.transaction():
            if row["command_id"] is not None:
                await conn.execute(
                    "SELECT 1 FROM commands WHERE id = $1 FOR UPDATE", row["command_id"]
                )
            current = await conn.fetchrow(
                f"SELECT {APPROVAL_COLUMNS} FROM approval_requests WHERE id = $1 "
                f"AND status = 'pending' AND expires_at <= now() FOR UPDATE",
                row["id"],
            )
            if current is None:
                continue
            await set_status(conn, current, "expired", None, "expired before a decision", "jarvisd")
        expired.append(await get_approval(conn, row["id"]))
    return expired
