"""Batched ingest of requested commands (the agent bus's hot path, DESIGN §5).

One statement per batch does what ``create_command`` does per row: the
commands (idempotent on request_id), their audit events, and, for those at or
above the approval threshold, their approval requests with their own audit
events. Rows naming a user that does not exist are left out and reported.
"""

from __future__ import annotations

import uuid
from typing import Literal

import asyncpg
import msgspec

from actors.data.model import CommandCreate, digest_sql, risk_category

__all__ = ["Ingested", "ingest_commands"]

Outcome = Literal["created", "exists", "no_user", "conflict"]


class Ingested(msgspec.Struct, frozen=True):
    """What became of one row."""

    request_id: str
    outcome: Outcome
    command_id: int | None = None
    status: str | None = None
    approval_id: int | None = None
    risk_score: int = 0
    user_id: int | None = None


_INGEST = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                         $7::text[], $8::text[], $9::smallint[], $10::text[])
        AS t(request_id, user_id, source, type, action, parameters, description, status,
             risk_score, risk_category)
),
ins AS (
    INSERT INTO commands (request_id, user_id, source, type, action, parameters, description,
                          status, risk_score, risk_category)
    SELECT request_id, user_id, source, type, action, parameters, description, status,
           risk_score, risk_category
    FROM input
    WHERE input.user_id IS NULL OR EXISTS (SELECT 1 FROM users u WHERE u.id = input.user_id)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING id, request_id, status, user_id
),
events AS (
    INSERT INTO command_events (command_id, from_status, to_status)
    SELECT id, NULL, status FROM ins
),
approvals AS (
    INSERT INTO approval_requests (command_id, requester_id, action, description,
                                   parameters_digest, risk_score, risk_category, status, expires_at)
    SELECT ins.id, ins.user_id, input.action, input.description, DIGEST,
           input.risk_score, input.risk_category, 'pending', now() + make_interval(secs => $11)
    FROM ins JOIN input USING (request_id)
    WHERE ins.status = 'awaiting_approval'
    RETURNING id, command_id
),
approval_audit AS (
    INSERT INTO approval_events (approval_id, from_status, to_status)
    SELECT id, NULL, 'pending' FROM approvals
)
SELECT ins.id, ins.request_id, ins.status, ins.user_id, approvals.id AS approval_id
FROM ins LEFT JOIN approvals ON approvals.command_id = ins.id
""".replace("DIGEST", digest_sql("input.parameters"))

# The rows already there for request ids that were not inserted, with whether
# the parameters are the same as PostgreSQL stores them (jsonb equality).
_EXISTING = """
SELECT m.n, c.id, c.request_id, c.status, c.user_id, c.created_by, c.action,
       c.parameters = m.parameters AS same_parameters,
       (SELECT max(a.id) FROM approval_requests a WHERE a.command_id = c.id) AS approval_id
FROM unnest($1::text[], $2::jsonb[]) WITH ORDINALITY AS m(request_id, parameters, n)
JOIN commands c ON c.request_id = m.request_id
"""


async def ingest_commands(
    conn: asyncpg.Connection,
    rows: list[tuple[CommandCreate, int | None]],
    *,
    threshold: int,
    expiry: int,
    policy_scores: list[int] | None = None,
) -> list[Ingested]:
    """Insert ``rows`` ((command, on whose behalf)) in one transaction; one
    Ingested per row, in order. A request_id that appears twice is created
    once; the later one reports "exists"."""
    request_ids = [c.request_id or f"api-{uuid.uuid4()}" for c, _u in rows]
    scores = [
        max(policy, c.risk_score or 0)
        for (c, _u), policy in zip(rows, policy_scores or [0] * len(rows), strict=True)
    ]
    statuses = ["awaiting_approval" if s >= threshold else "approved" for s in scores]
    user_ids = [u for _c, u in rows]
    async with conn.transaction():
        inserted = await conn.fetch(
            _INGEST,
            request_ids,
            user_ids,
            [c.source for c, _u in rows],
            [c.type for c, _u in rows],
            [c.action for c, _u in rows],
            [c.parameters for c, _u in rows],
            [c.description for c, _u in rows],
            statuses,
            scores,
            [risk_category(s) for s in scores],
            expiry,
        )
        made = {r["request_id"]: r for r in inserted}
        missing = [i for i, rid in enumerate(request_ids) if rid not in made]
        existing: dict[int, asyncpg.Record] = {}
        if missing:
            for r in await conn.fetch(
                _EXISTING,
                [request_ids[i] for i in missing],
                [rows[i][0].parameters for i in missing],
            ):
                existing[missing[r["n"] - 1]] = r
    out: list[Ingested] = []
    first: dict[str, tuple[CommandCreate, int | None]] = {}
    for n, ((new, user_id), rid, score) in enumerate(zip(rows, request_ids, scores, strict=True)):
        row = made.get(rid)
        if row is not None and rid not in first:
            first[rid] = (new, user_id)
            out.append(
                Ingested(
                    rid, "created", row["id"], row["status"], row["approval_id"], score, user_id
                )
            )
            continue
        old = existing.get(n)
        if row is None and old is None:
            out.append(Ingested(rid, "no_user", risk_score=score, user_id=user_id))
            continue
        if rid in first and first[rid] != (new, user_id):
            out.append(Ingested(rid, "conflict", risk_score=score, user_id=user_id))
            continue
        if old is not None and not _repeats(old, new, user_id):
            # The requestId names another command: nothing of it in our answer.
            out.append(Ingested(rid, "conflict", risk_score=score, user_id=user_id))
            continue
        found = row if row is not None else old
        assert found is not None
        out.append(
            Ingested(
                rid, "exists", found["id"], found["status"], found["approval_id"], score, user_id
            )
        )
    return out


def _repeats(old: asyncpg.Record, new: CommandCreate, user_id: int | None) -> bool:
    """An idempotent redelivery: made on the bus too, for the same user, action
    and parameters."""
    return (
        old["created_by"] is None
        and old["user_id"] == user_id
        and old["action"] == new.action
        and bool(old["same_parameters"])
    )
