"""Batched ingest of requested commands (the agent bus's hot path, DESIGN §5).

One statement per batch does what ``create_command`` does per row: the
commands (idempotent on the sender's request_id), their audit events, and,
for those at or above the approval threshold, their approval requests with
their own audit events. Rows naming a user that does not exist are left out
and reported.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime
from typing import Literal

import asyncpg
import msgspec

from actors.data.model import CommandCreate, Rating, digest_sql, risk_category

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
    expires_at: datetime | None = None  # of the approval request, when one was made


# A requestId given twice in one batch is inserted once, from its first row
# whose users exist (``chosen``: DISTINCT ON … ORDER BY the row's place); the
# approval request is made from that same row (its score's rule and quorum)
# and the command as stored, never from another row of the batch.
_INGEST = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                         $7::text[], $8::text[], $9::smallint[], $10::text[], $12::bigint[],
                         $13::text[], $14::text[], $15::smallint[], $16::smallint[]) WITH ORDINALITY
        AS t(request_id, user_id, source, type, action, parameters, description, status,
             risk_score, risk_category, created_by, sender, score_rule, approvals_required,
             admins_required, n)
),
chosen AS (
    SELECT DISTINCT ON (sender, request_id) * FROM input
    WHERE (input.user_id IS NULL OR EXISTS (SELECT 1 FROM users u WHERE u.id = input.user_id))
      AND (input.created_by IS NULL OR EXISTS (SELECT 1 FROM users u WHERE u.id = input.created_by))
    ORDER BY sender, request_id, n
),
ins AS (
    INSERT INTO commands (request_id, user_id, source, type, action, parameters, description,
                          status, risk_score, risk_category, created_by, sender)
    SELECT request_id, user_id, source, type, action, parameters, description, status,
           risk_score, risk_category, created_by, sender
    FROM chosen
    ON CONFLICT (sender, request_id) DO NOTHING
    RETURNING id, request_id, status, user_id, created_by, sender, action, description,
              parameters, risk_score, risk_category
),
events AS (
    INSERT INTO command_events (command_id, from_status, to_status, actor_id)
    SELECT id, NULL, status, created_by FROM ins
),
approvals AS (
    INSERT INTO approval_requests (command_id, requester_id, created_by, action, description,
                                   parameters_digest, risk_score, risk_category, status, expires_at,
                                   score_rule, approvals_required, admins_required)
    SELECT ins.id, ins.user_id, ins.created_by, ins.action, ins.description, DIGEST,
           ins.risk_score, ins.risk_category, 'pending', now() + make_interval(secs => $11),
           chosen.score_rule, chosen.approvals_required, chosen.admins_required
    FROM ins JOIN chosen ON chosen.sender = ins.sender AND chosen.request_id = ins.request_id
    WHERE ins.status = 'awaiting_approval'
    RETURNING id, command_id, created_by, expires_at
),
approval_audit AS (
    INSERT INTO approval_events (approval_id, from_status, to_status, actor_id)
    SELECT id, NULL, 'pending', created_by FROM approvals
)
SELECT ins.id, ins.request_id, ins.sender, ins.status, ins.user_id, chosen.n,
       approvals.id AS approval_id, approvals.expires_at
FROM ins JOIN chosen ON chosen.sender = ins.sender AND chosen.request_id = ins.request_id
LEFT JOIN approvals ON approvals.command_id = ins.id
""".replace("DIGEST", digest_sql("ins.parameters"))

# The rows already there for request ids that were not inserted, with whether
# the parameters are the same as PostgreSQL stores them (jsonb equality).
_EXISTING = """
SELECT m.n, c.id, c.request_id, c.status, c.user_id, c.created_by, c.action,
       c.parameters = m.parameters AS same_parameters,
       (SELECT max(a.id) FROM approval_requests a WHERE a.command_id = c.id) AS approval_id
FROM unnest($1::text[], $2::jsonb[], $3::text[]) WITH ORDINALITY AS m(request_id, parameters, sender, n)
JOIN commands c ON c.sender = m.sender AND c.request_id = m.request_id
"""


Row = tuple[CommandCreate, int | None, int | None, str]


async def ingest_commands(
    conn: asyncpg.Connection,
    rows: list[Row],
    *,
    threshold: int,
    expiry: int,
    ratings: list[Rating],
) -> list[Ingested]:
    """Insert ``rows`` ((command, on whose behalf, sent by (user id), sender))
    in one transaction, each with its ``ratings`` (score and quorum); one
    Ingested per row, in order. A requestId is the sender's: one that appears
    twice for one sender is created once, and the later one reports "exists"."""
    request_ids = [c.request_id or f"api-{uuid.uuid4()}" for c, *_rest in rows]
    senders = [sender for *_rest, sender in rows]
    keys = list(zip(senders, request_ids, strict=True))
    scores = [r.score for r in ratings]
    statuses = ["awaiting_approval" if s >= threshold else "approved" for s in scores]
    # Atomic: in the caller's transaction (the persistence actor's, which
    # also writes the events), else in one of its own; never a savepoint,
    # which would cost two more round trips a batch.
    tx = contextlib.nullcontext() if conn.is_in_transaction() else conn.transaction()
    async with tx:
        inserted = await conn.fetch(
            _INGEST,
            request_ids,
            [u for _c, u, _b, _s in rows],
            [c.source for c, *_rest in rows],
            [c.type for c, *_rest in rows],
            [c.action for c, *_rest in rows],
            [c.parameters for c, *_rest in rows],
            [c.description for c, *_rest in rows],
            statuses,
            scores,
            [risk_category(s) for s in scores],
            expiry,
            [b for _c, _u, b, _s in rows],
            senders,
            [r.rule for r in ratings],
            [r.approvals for r in ratings],
            [r.admins for r in ratings],
        )
        made = {(r["sender"], r["request_id"]): r for r in inserted}
        missing = [i for i, key in enumerate(keys) if key not in made]
        existing: dict[int, asyncpg.Record] = {}
        if missing:
            for r in await conn.fetch(
                _EXISTING,
                [request_ids[i] for i in missing],
                [rows[i][0].parameters for i in missing],
                [senders[i] for i in missing],
            ):
                existing[missing[r["n"] - 1]] = r
    out: list[Ingested] = []
    first: dict[tuple[str, str], Row] = {}
    for n, (row_in, key, score) in enumerate(zip(rows, keys, scores, strict=True)):
        new, user_id, created_by, _sender = row_in
        rid = key[1]
        row = made.get(key)
        if row is not None and row["n"] > n + 1:
            # An earlier row of the batch with the key that was inserted from a
            # later one: it was passed over, its user does not exist.
            out.append(Ingested(rid, "no_user", risk_score=score, user_id=user_id))
            continue
        if row is not None and row["n"] == n + 1:
            first[key] = row_in
            out.append(
                Ingested(
                    rid,
                    "created",
                    row["id"],
                    row["status"],
                    row["approval_id"],
                    score,
                    user_id,
                    row["expires_at"],
                )
            )
            continue
        old = existing.get(n)
        if row is None and old is None:
            out.append(Ingested(rid, "no_user", risk_score=score, user_id=user_id))
            continue
        if key in first and first[key] != row_in:
            out.append(Ingested(rid, "conflict", risk_score=score, user_id=user_id))
            continue
        if old is not None and not _repeats(old, new, user_id, created_by):
            # The sender's own requestId, used before for another command.
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


def _repeats(
    old: asyncpg.Record, new: CommandCreate, user_id: int | None, created_by: int | None
) -> bool:
    """An idempotent redelivery: by the same sender (the lookup's key), for
    the same user, action and parameters (as PostgreSQL stores them)."""
    return (
        old["created_by"] == created_by
        and old["user_id"] == user_id
        and old["action"] == new.action
        and bool(old["same_parameters"])
    )
