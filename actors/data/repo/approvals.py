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
import msgspec

from actors.data.listing import ID_BOUNDS, Filter, ListQuery, ListSpec
from actors.data.model import (
    Approval,
    ApprovalCreate,
    Page,
    Principal,
    Rating,
    Vote,
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

_AT = """to_char(v.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
APPROVAL_COLUMNS = (
    "id, command_id, requester_id, action, description, parameters_digest, risk_score, risk_category, "
    "status, expires_at, decided_by, decider, decided_at, reason, created_at, created_by, "
    "coalesce(approval_requests.parameters, (SELECT c.parameters FROM commands c "
    "WHERE c.id = approval_requests.command_id), '{}'::jsonb) AS parameters, "
    "score_rule, approvals_required, admins_required, escalated_at, "
    "(SELECT u.username FROM users u WHERE u.id = approval_requests.requester_id) AS requester, "
    "coalesce((SELECT c.sender FROM commands c WHERE c.id = approval_requests.command_id), "
    "(SELECT 'user:' || u.username FROM users u WHERE u.id = approval_requests.created_by)) AS sender, "
    # The approvals that count: by people who may still decide, as they are now
    # (a voter made a user, or disabled, since no longer fills a place).
    "coalesce((SELECT jsonb_agg(jsonb_build_object('by', v.decider, 'userId', v.user_id, "
    f"'admin', vu.role = 'admin', 'reason', v.reason, 'at', {_AT}) ORDER BY v.at, v.user_id) "
    "FROM approval_votes v JOIN users vu ON vu.id = v.user_id "
    "AND vu.role IN ('admin', 'approver') AND NOT vu.disabled "
    "WHERE v.approval_id = approval_requests.id), '[]'::jsonb) AS approvals"
)


def approval_of(row: asyncpg.Record) -> Approval:
    """A request as its row is (helper columns of the queries dropped)."""
    data = dict(row)
    for helper in ("lapsed", "ref_request_id", "ref_sender"):  # of decide_approval, warn_due
        data.pop(helper, None)
    data["approvals"] = msgspec.convert(data["approvals"], list[Vote])
    return Approval(**data)


async def create_approval(
    conn: asyncpg.Connection,
    new: ApprovalCreate,
    requester_id: int | None,
    *,
    expires_in: int,
    rating: Rating,
) -> Approval:
    """A standalone request by ``requester_id`` (who is also its creator),
    rated by the policy (or scored by the requester if higher)."""
    async with conn.transaction():
        row = await insert_approval(
            conn,
            command_id=None,
            requester_id=requester_id,
            created_by=requester_id,
            action=new.action,
            description=new.description,
            parameters=new.parameters,
            rating=rating,
            expires_in=expires_in,
        )
    return approval_of(row)


async def insert_approval(
    conn: asyncpg.Connection,
    *,
    command_id: int | None,
    requester_id: int | None,
    created_by: int | None,
    action: str,
    description: str,
    parameters: Any,
    rating: Rating,
    expires_in: int,
) -> asyncpg.Record:
    """A pending approval request bound to the parameters' digest, with its
    audit event. A standalone request keeps its parameters; a command's are
    read from the command."""
    row = await conn.fetchrow(
        f"INSERT INTO approval_requests (command_id, requester_id, created_by, action, description, "
        f"parameters_digest, risk_score, risk_category, status, expires_at, parameters, score_rule, "
        f"approvals_required, admins_required) "
        f"VALUES ($1, $2, $3, $4, $5, {digest_sql('$6::jsonb')}, $7, $8, 'pending', "
        f"now() + make_interval(secs => $9), CASE WHEN $1::bigint IS NULL THEN $6::jsonb END, $10, "
        f"$11, $12) "
        f"RETURNING {APPROVAL_COLUMNS}",
        command_id,
        requester_id,
        created_by,
        action,
        description,
        parameters,
        rating.score,
        risk_category(rating.score),
        expires_in,
        rating.rule,
        rating.approvals,
        rating.admins,
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
    return approval_of(row)


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
        if decision == "rejected" and current["admins_required"] and not who.is_admin:
            raise Forbidden(f"a {current['risk_category']} request is rejected by an admin")
    elif decision == "cancelled":
        if not who.is_admin and not own:
            raise Forbidden("only the requester, its creator or an admin cancels a request")
    else:
        raise Invalid(f"unknown decision {decision!r}")


def _check_vote(current: asyncpg.Record, who: Principal) -> bool:
    """Whether ``who``'s approval completes the quorum (raises when it may
    not count: a second approval by the same person, the local admin's in a
    quorum of people, or a non-admin's taking a place an admin must fill)."""
    votes = [msgspec.convert(v, Vote) for v in current["approvals"]]
    need = current["approvals_required"]
    if need > 1 and who.user_id is None:
        raise Forbidden(
            f"request {current['id']} needs {need} people's approvals: approve it as a user "
            "of your own (--token), not as the host's local admin"
        )
    if any(v.user_id == who.user_id for v in votes):
        raise Conflict(
            f"you approved request {current['id']} already; it needs "
            f"{max(need - len(votes), 0)} more approval(s) by others",
            approval_of(current),
        )
    admins_needed = current["admins_required"] - sum(v.admin for v in votes)
    places_left = need - len(votes)
    if not who.is_admin and admins_needed >= places_left:
        if need == 1:
            raise Forbidden(f"a {current['risk_category']} request needs an admin")
        raise Forbidden(
            f"the {'last ' if places_left == 1 else ''}{admins_needed} approval(s) of request "
            f"{current['id']} must come from an admin"
        )
    return bool(places_left <= 1)


async def decide_approval(
    conn: asyncpg.Connection, approval_id: int, decision: str, who: Principal, reason: str | None
) -> tuple[Approval, bool]:
    """approved | rejected | cancelled, checked against the row as it is when
    the decision lands; returns the request and whether it was decided (an
    approval short of its quorum is recorded, and the request stays pending).
    A request no longer pending is a Conflict, whoever decided it and however
    (even the same decision again, so that of two deciders racing exactly
    one succeeds at each step); one found past its deadline is expired (and
    that is committed) instead of decided: Expired."""
    if decision == "rejected" and not reason:
        raise Invalid("a rejection needs a reason")
    lapsed = False
    decided = True
    async with conn.transaction():
        # Locks are taken command first, then request, as a status report does
        # (cancelling a waiting command cancels its request): never a deadlock.
        command_id = await conn.fetchval(
            "SELECT command_id FROM approval_requests WHERE id = $1", approval_id
        )
        if command_id is not None:
            await conn.execute("SELECT 1 FROM commands WHERE id = $1 FOR UPDATE", command_id)
        # The lock first, then the row in a statement of its own: a statement
        # that waited for the lock sees what committed meanwhile in the locked
        # row alone, not in its subqueries (the approvals so far).
        await conn.execute("SELECT 1 FROM approval_requests WHERE id = $1 FOR UPDATE", approval_id)
        current = await conn.fetchrow(
            f"SELECT {APPROVAL_COLUMNS}, expires_at <= now() AS lapsed FROM approval_requests "
            f"WHERE id = $1",
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
                f"approval request {approval_id} is already {current['status']}",
                approval_of(current),
            )
        elif decision == "approved":
            if current["command_id"] is not None:
                await _check_bound_command(conn, current)
            decided = _check_vote(current, who)
            if current["approvals_required"] > 1:
                await _record_vote(conn, current, who, reason)
            if decided:
                await set_status(conn, current, decision, who.user_id, reason, who.name)
        else:
            await set_status(conn, current, decision, who.user_id, reason, who.name)
    approval = await get_approval(conn, approval_id)
    if lapsed:
        raise Expired(f"approval request {approval_id} expired", approval)
    return approval, decided


async def _record_vote(
    conn: asyncpg.Connection, current: asyncpg.Record, who: Principal, reason: str | None
) -> None:
    """One approval towards a quorum, with its audit row."""
    await conn.execute(
        # A vote left by someone who could not decide for a while is replaced.
        "INSERT INTO approval_votes (approval_id, user_id, decider, admin, reason) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (approval_id, user_id) DO UPDATE SET "
        "decider = excluded.decider, admin = excluded.admin, reason = excluded.reason, "
        "at = clock_timestamp()",
        current["id"],
        who.user_id,
        who.name,
        who.is_admin,
        reason,
    )
    await conn.execute(
        "INSERT INTO approval_events (approval_id, from_status, to_status, actor_id, reason) "
        "VALUES ($1, 'pending', 'pending', $2, $3)",
        current["id"],
        who.user_id,
        f"approved by {who.name} ({len(current['approvals']) + 1} of "
        f"{current['approvals_required']})" + (f": {reason}" if reason else ""),
    )


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
    return await page(conn, APPROVALS, lq, approval_of, count)


class Step(msgspec.Struct, frozen=True, rename="camel"):
    """One step of a request's history, or of its command's."""

    at: datetime
    subject: str  # approval | command
    from_: str | None = msgspec.field(name="from")
    to: str
    by: str | None
    reason: str | None


async def history(conn: asyncpg.Connection, approval_id: int, limit: int = 200) -> list[Step]:
    """The request's audit rows and its command's, oldest first (at most ``limit``)."""
    rows = await conn.fetch(
        "WITH a AS (SELECT id, command_id FROM approval_requests WHERE id = $1) "
        "SELECT * FROM ("
        "SELECT e.at, 'approval' AS subject, e.from_status, e.to_status, "
        "coalesce(u.username, CASE WHEN e.actor_id IS NULL THEN NULL ELSE 'user ' || e.actor_id END) "
        "AS by, e.reason, e.id FROM approval_events e JOIN a ON e.approval_id = a.id "
        "LEFT JOIN users u ON u.id = e.actor_id "
        "UNION ALL "
        "SELECT e.at, 'command', e.from_status, e.to_status, "
        "coalesce(u.username, CASE WHEN e.actor_id IS NULL THEN NULL ELSE 'user ' || e.actor_id END), "
        "e.reason, e.id FROM command_events e JOIN a ON e.command_id = a.command_id "
        "LEFT JOIN users u ON u.id = e.actor_id) h ORDER BY at, subject, id LIMIT $2",
        approval_id,
        limit,
    )
    return [
        Step(r["at"], r["subject"], r["from_status"], r["to_status"], r["by"], r["reason"])
        for r in rows
    ]
