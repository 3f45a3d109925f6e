"""Every event the daemon sends is built here, from the rows as committed:
one function per change, each filling every field of its event type."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec

from actors.events.kinds import (
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalExpired,
    ApprovalRequested,
    ApprovalVote,
    ApprovalWarning,
    CommandApproved,
    CommandCreated,
    CommandRejected,
    CommandUpdated,
    EnvelopeRefused,
    Event,
    EventData,
    Published,
)

if TYPE_CHECKING:
    from actors.data.model import Approval, Command, CommandCreate, Vote
    from actors.data.repo import Ingested

__all__ = [
    "approval_decided",
    "approval_escalated",
    "approval_requested",
    "approval_vote",
    "approval_warning",
    "command_created",
    "command_decided",
    "command_ingested",
    "command_updated",
    "now",
    "publish",
    "refusal",
]

# The command a request belongs to, as agents know it: (requestId, sender).
CommandRef = tuple[str, str] | None

# -- the envelope --------------------------------------------------------------------------------
_last_ts: tuple[int, str] = (0, "")


def now() -> str:
    """The time as ISO 8601 to the millisecond (formatted once per millisecond)."""
    global _last_ts
    ms = time.time_ns() // 1_000_000
    if ms != _last_ts[0]:
        when = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
        _last_ts = (ms, when.replace("+00:00", "Z"))
    return _last_ts[1]


def publish(data: EventData, user_id: int | None) -> Published:
    """``data`` as a new event, with the kind (channel) it belongs to. Its
    id is given by the outbox, as it is written (``outbox.store``)."""
    return data.KIND, Event(id="", type=data.TYPE, ts=now(), user_id=user_id, data=data)


# -- built from the rows as committed ------------------------------------------------------------
def command_created(c: Command) -> Published:
    return publish(
        CommandCreated(
            command_id=c.id,
            request_id=c.request_id,
            sender=c.sender,
            status=c.status,
            action=c.action,
            type=c.type,
            source=c.source,
            risk_score=c.risk_score,
            risk_category=c.risk_category,
            approval_id=c.approval_id,
        ),
        c.user_id,
    )


def command_ingested(
    done: Ingested, new: CommandCreate, sender: str, risk_category: str
) -> list[Published]:
    """command.created (and approval.requested) of a command the bus ingested."""
    assert done.command_id is not None
    assert done.status is not None
    out = [
        publish(
            CommandCreated(
                command_id=done.command_id,
                request_id=done.request_id,
                sender=sender,
                status=done.status,
                action=new.action,
                type=new.type,
                source=new.source,
                risk_score=done.risk_score,
                risk_category=risk_category,
                approval_id=done.approval_id,
            ),
            done.user_id,
        )
    ]
    if done.approval_id is not None and done.expires_at is not None:
        out.append(
            publish(
                ApprovalRequested(
                    approval_id=done.approval_id,
                    command_id=done.command_id,
                    request_id=done.request_id,
                    sender=sender,
                    action=new.action,
                    description=new.description,
                    risk_score=done.risk_score,
                    risk_category=risk_category,
                    expires_at=done.expires_at,
                ),
                done.user_id,
            )
        )
    return out


def command_updated(c: Command, previous: str) -> Published:
    return publish(
        CommandUpdated(
            command_id=c.id,
            request_id=c.request_id,
            sender=c.sender,
            status=c.status,
            previous=previous,
            error=c.error,
            duration_ms=c.duration_ms,
            approval_id=c.approval_id,
        ),
        c.user_id,
    )


def command_decided(c: Command) -> Published:
    """What an approval decision did to its command: command.approved, or
    command.rejected (rejected or expired; ``status`` says which)."""
    if c.status not in ("approved", "rejected", "expired"):
        return command_updated(c, "awaiting_approval")
    kind = CommandApproved if c.status == "approved" else CommandRejected
    return publish(
        kind(
            command_id=c.id,
            request_id=c.request_id,
            sender=c.sender,
            status=c.status,
            previous="awaiting_approval",
            approval_id=c.approval_id,
        ),
        c.user_id,
    )


def approval_requested(a: Approval, ref: CommandRef, user_id: int | None) -> Published:
    return publish(
        ApprovalRequested(
            approval_id=a.id,
            command_id=a.command_id,
            request_id=ref[0] if ref else None,
            sender=ref[1] if ref else None,
            action=a.action,
            description=a.description,
            risk_score=a.risk_score,
            risk_category=a.risk_category,
            expires_at=a.expires_at,
        ),
        user_id,
    )


def approval_warning(a: Approval, ref: CommandRef) -> Published:
    return publish(
        ApprovalWarning(
            approval_id=a.id,
            command_id=a.command_id,
            request_id=ref[0] if ref else None,
            sender=ref[1] if ref else None,
            action=a.action,
            risk_category=a.risk_category,
            expires_at=a.expires_at,
        ),
        a.requester_id,
    )


def approval_decided(a: Approval, ref: CommandRef) -> Published:
    """approval.decided; for a request that ran out of time, approval.expired."""
    kind = ApprovalExpired if a.status == "expired" else ApprovalDecided
    return publish(
        kind(
            approval_id=a.id,
            command_id=a.command_id,
            request_id=ref[0] if ref else None,
            sender=ref[1] if ref else None,
            decision=a.status,
            decided_by=a.decided_by,
            decider=a.decider,
            reason=a.reason,
        ),
        a.requester_id,
    )


def approval_vote(a: Approval, ref: CommandRef, vote: Vote) -> Published:
    """``vote``, an approval of a request still short of its quorum."""
    return publish(
        ApprovalVote(
            approval_id=a.id,
            command_id=a.command_id,
            request_id=ref[0] if ref else None,
            sender=ref[1] if ref else None,
            by=vote.by,
            admin=vote.admin,
            reason=vote.reason,
            approvals=len(a.approvals),
            approvals_required=a.approvals_required,
            admins_required=a.admins_required,
        ),
        a.requester_id,
    )


def approval_escalated(a: Approval, ref: CommandRef) -> Published:
    return publish(
        ApprovalEscalated(
            approval_id=a.id,
            command_id=a.command_id,
            request_id=ref[0] if ref else None,
            sender=ref[1] if ref else None,
            action=a.action,
            description=a.description,
            risk_score=a.risk_score,
            risk_category=a.risk_category,
            requester=a.requester,
            approvals=len(a.approvals),
            approvals_required=a.approvals_required,
            created_at=a.created_at,
            expires_at=a.expires_at,
        ),
        a.requester_id,
    )


_encode = msgspec.json.Encoder().encode


def refusal(envelope_id: str, entry: str, path: str, reason: str) -> bytes:
    """What an agent hears on its replies channel when an envelope is refused."""
    return _encode(
        EnvelopeRefused(
            id=envelope_id,
            entry=entry,
            path=path,
            reason=reason[:1000],
            at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        )
    )
