"""What the sweeper does to pending approval requests (one daemon at a
time, DESIGN §6): warn those near their deadline, escalate those left
unanswered, expire those past it; and how old the pending ones are."""

from __future__ import annotations

import asyncpg

from actors.data.model import Approval
from actors.data.repo.approvals import APPROVAL_COLUMNS, approval_of, get_approval, set_status

__all__ = ["escalate_due", "expire_due", "pending_ages", "warn_due"]

# The command a request belongs to, as agents know it, beside the request's columns.
_REF = (
    "(SELECT request_id FROM commands c WHERE c.id = command_id) AS ref_request_id, "
    "(SELECT sender FROM commands c WHERE c.id = command_id) AS ref_sender"
)


def _with_ref(rows: list[asyncpg.Record]) -> list[tuple[Approval, tuple[str, str] | None]]:
    """Each request, with its command's (request id, sender) when it has one."""
    return [
        (
            approval_of(r),
            None if r["ref_request_id"] is None else (r["ref_request_id"], r["ref_sender"]),
        )
        for r in rows
    ]


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
        f"FOR UPDATE SKIP LOCKED) RETURNING {APPROVAL_COLUMNS}, {_REF}",
        warn_before,
        limit,
    )
    return _with_ref(rows)


async def escalate_due(
    conn: asyncpg.Connection, after: float, limit: int
) -> list[tuple[Approval, tuple[str, str] | None]]:
    """Pending requests made ``after`` seconds ago or more, not yet
    escalated: marked escalated (each is returned once), with their command's
    (request id, sender)."""
    rows = await conn.fetch(
        f"UPDATE approval_requests SET escalated_at = now() WHERE id IN ("
        f"SELECT id FROM approval_requests WHERE status = 'pending' AND escalated_at IS NULL "
        f"AND created_at <= now() - make_interval(secs => $1) AND expires_at > now() "
        f"ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING {APPROVAL_COLUMNS}, {_REF}",
        after,
        limit,
    )
    for r in rows:
        await conn.execute(
            "INSERT INTO approval_events (approval_id, from_status, to_status, reason) "
            "VALUES ($1, 'pending', 'pending', $2)",
            r["id"],
            f"escalated: no decision after {after:g} s",
        )
    return _with_ref(rows)


async def pending_ages(
    conn: asyncpg.Connection, bounds: tuple[float, ...]
) -> tuple[list[int], float]:
    """How many pending requests are at most each of ``bounds`` seconds old
    (cumulative), all of them last; and the sum of their ages."""
    cols = ", ".join(
        f"count(*) FILTER (WHERE created_at >= now() - make_interval(secs => {float(b)!r}))"
        for b in bounds
    )
    row = await conn.fetchrow(
        f"SELECT {cols}, count(*), coalesce(sum(extract(epoch FROM now() - created_at)), 0)::float8 "
        f"FROM approval_requests WHERE status = 'pending'"
    )
    values = list(row.values())
    return [int(v) for v in values[:-1]], float(values[-1])


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
