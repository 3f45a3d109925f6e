"""Approval requests: made, read, decided, and swept when they run out of
time. Each change is committed, then announced (``actors.events``)."""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
import msgspec

from actors import events
from actors.data import repo
from actors.data.model import Approval, ApprovalCreate, Command, Page, Principal
from actors.data.repo import Expired
from actors.data.repo.common import JsonPage
from actors.persistence.base import AGE_BUCKETS, Count, Durations, PgMessage, Store, rate, room

__all__ = [
    "ApprovalHistory",
    "CreateApproval",
    "DecideApproval",
    "GetApproval",
    "ListApprovals",
    "PendingAges",
    "SweepApprovals",
    "Swept",
    "approvals",
]

approvals = room("approvals")


class CreateApproval(PgMessage[Approval], frozen=True):
    """A standalone request (not bound to a command)."""

    new: ApprovalCreate
    requester_id: int | None


@approvals.handles(CreateApproval)
async def create_approval(db: Store, msg: CreateApproval) -> Approval:
    policy = db.approvals
    expires_in = min(msg.new.expires_in or policy.expiry, policy.max_expiry)
    rating = rate(policy, msg.new.action, msg.new.risk_score)
    async with db.writing() as w:
        approval = await repo.create_approval(
            w.conn, msg.new, msg.requester_id, expires_in=expires_in, rating=rating
        )
        w.announce([events.approval_requested(approval, None, approval.requester_id)])
    return approval


class GetApproval(PgMessage[Approval], frozen=True):
    approval_id: int


@approvals.handles(GetApproval)
async def get_approval(db: Store, msg: GetApproval) -> Approval:
    async with db.pool().acquire() as conn:
        return await repo.get_approval(conn, msg.approval_id)


class ListApprovals(PgMessage[Page[Approval] | JsonPage], frozen=True):
    query: Any  # ListQuery, parsed at the edge
    count: Count = None
    as_json: bool = False


@approvals.handles(ListApprovals)
async def list_approvals(db: Store, msg: ListApprovals) -> Page[Approval] | JsonPage:
    async with db.pool().acquire() as conn:
        return await repo.list_approvals(conn, msg.query, msg.count, as_json=msg.as_json)


class DecideApproval(PgMessage[Approval], frozen=True):
    """A person's decision (the rules: no self-approval, the quorum's admins,
    a decided request is a Conflict, an expired one Expired). An approval
    short of the request's quorum is recorded, and the request stays pending."""

    approval_id: int
    decision: Literal["approved", "rejected", "cancelled"]
    who: Principal
    reason: str | None = None


@approvals.handles(DecideApproval)
async def decide_approval(db: Store, msg: DecideApproval) -> Approval:
    expired: Expired | None = None
    async with db.writing() as w:
        try:
            approval, decided = await repo.decide_approval(
                w.conn, msg.approval_id, msg.decision, msg.who, msg.reason
            )
        except Expired as exc:  # the expiry is committed, and announced
            expired, approval, decided = exc, exc.current, True
        if decided:
            w.announce(await _decided(w.conn, approval))
        else:
            (vote,) = [v for v in approval.approvals if v.user_id == msg.who.user_id]
            w.announce([events.approval_vote(approval, await _ref(w.conn, approval), vote)])
    if decided:
        _observe(db, approval)
    if expired is not None:
        raise expired
    return approval


def _observe(db: Store, approval: Approval) -> None:
    if approval.decided_at is not None:
        waited = (approval.decided_at - approval.created_at).total_seconds()
        db.decision_seconds.setdefault(approval.status, Durations()).observe(waited)


async def _command_of(conn: asyncpg.Connection, approval: Approval) -> Command | None:
    """The request's command (None: standalone, or deleted with its user)."""
    if approval.command_id is None:
        return None
    try:
        return await repo.get_command(conn, approval.command_id)
    except repo.NotFound:
        return None


async def _ref(conn: asyncpg.Connection, approval: Approval) -> tuple[str, str] | None:
    command = await _command_of(conn, approval)
    return None if command is None else (command.request_id, command.sender)


class ApprovalHistory(PgMessage[list[repo.Step]], frozen=True):
    approval_id: int


@approvals.handles(ApprovalHistory)
async def approval_history(db: Store, msg: ApprovalHistory) -> list[repo.Step]:
    async with db.pool().acquire() as conn:
        return await repo.history(conn, msg.approval_id)


class PendingAges(PgMessage[Durations], frozen=True):
    """How old the pending requests are, as a histogram (AGE_BUCKETS)."""


@approvals.handles(PendingAges)
async def pending_ages(db: Store, msg: PendingAges) -> Durations:
    async with db.pool().acquire() as conn:
        cumulative, total = await repo.pending_ages(conn, AGE_BUCKETS)
    counts = [b - a for a, b in zip([0, *cumulative[:-1]], cumulative, strict=True)]
    return Durations(counts=counts, total=total)


async def _decided(conn: asyncpg.Connection, approval: Approval) -> list[events.Published]:
    """approval.decided (or .expired), and what it did to its command."""
    command = await _command_of(conn, approval)
    ref = (command.request_id, command.sender) if command is not None else None
    out = [events.approval_decided(approval, ref)]
    if command is not None and command.status == approval.status:
        out.append(events.command_decided(command))
    return out


class Swept(msgspec.Struct, frozen=True):
    warned: int
    expired: int
    escalated: int = 0


class SweepApprovals(PgMessage[Swept], frozen=True):
    """Warn pending requests near their deadline (once each) and expire the
    ones past it: a rejection of the request and of its command, with their
    audit events. Asked by the one daemon that leads the sweep."""

    warn_before: float
    limit: int = 500
    escalate_after: float = 0.0  # 0: never


@approvals.handles(SweepApprovals)
async def sweep_approvals(db: Store, msg: SweepApprovals) -> Swept:
    async with db.writing() as w:
        escalated = []
        if msg.escalate_after > 0:
            escalated = await repo.escalate_due(w.conn, msg.escalate_after, msg.limit)
        warned = await repo.warn_due(w.conn, msg.warn_before, msg.limit)
        expired = await repo.expire_due(w.conn, msg.limit)
        w.announce([events.approval_escalated(a, ref) for a, ref in escalated])
        w.announce([events.approval_warning(a, ref) for a, ref in warned])
        for approval in expired:
            w.announce(await _decided(w.conn, approval))
    for approval in expired:
        _observe(db, approval)
    return Swept(len(warned), len(expired), len(escalated))
