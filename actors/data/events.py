"""The events a state change announces (DESIGN §5): envelopes for
``{prefix}events`` and the channel of their kind, built from the rows as
committed. Agents match them to what they asked for by ``requestId`` and
``sender`` (requestIds are per sender: ``agent:<name>``, ``user:<name>``)."""

from __future__ import annotations

from actors.data.model import Approval, Command
from actors.envelope import Event, EventKind, event

# The command a request belongs to, as agents know it: (requestId, sender).
CommandRef = tuple[str, str] | None

__all__ = [
    "approval_decided",
    "approval_requested",
    "approval_warning",
    "command_created",
    "command_decided",
    "command_updated",
]

Published = tuple[EventKind, Event]


def command_created(c: Command) -> Published:
    return event(
        "commands",
        "command.created",
        c.user_id,
        commandId=c.id,
        requestId=c.request_id,
        sender=c.sender,
        status=c.status,
        action=c.action,
        type=c.type,
        source=c.source or None,
        riskScore=c.risk_score,
        riskCategory=c.risk_category,
        approvalId=c.approval_id,
    )


def command_updated(c: Command, previous: str) -> Published:
    return event(
        "commands",
        "command.updated",
        c.user_id,
        commandId=c.id,
        requestId=c.request_id,
        sender=c.sender,
        status=c.status,
        previous=previous,
        error=c.error,
        durationMs=c.duration_ms,
        approvalId=c.approval_id,
    )


def approval_requested(a: Approval, ref: CommandRef, user_id: int | None) -> Published:
    return event(
        "approvals",
        "approval.requested",
        user_id,
        approvalId=a.id,
        commandId=a.command_id,
        requestId=ref[0] if ref else None,
        sender=ref[1] if ref else None,
        action=a.action,
        description=a.description or None,
        riskScore=a.risk_score,
        riskCategory=a.risk_category,
        expiresAt=a.expires_at.isoformat(),
    )


def approval_warning(a: Approval, ref: CommandRef) -> Published:
    """A pending request is about to expire."""
    return event(
        "approvals",
        "approval.warning",
        a.requester_id,
        approvalId=a.id,
        commandId=a.command_id,
        requestId=ref[0] if ref else None,
        sender=ref[1] if ref else None,
        action=a.action,
        riskCategory=a.risk_category,
        expiresAt=a.expires_at.isoformat(),
    )


def command_decided(c: Command) -> Published:
    """What an approval decision did to its command: command.approved, or
    command.rejected (rejected or expired; ``status`` says which)."""
    name = "command.approved" if c.status == "approved" else "command.rejected"
    if c.status not in ("approved", "rejected", "expired"):
        name = "command.updated"
    return event(
        "commands",
        name,
        c.user_id,
        commandId=c.id,
        requestId=c.request_id,
        sender=c.sender,
        status=c.status,
        previous="awaiting_approval",
        approvalId=c.approval_id,
    )


def approval_decided(a: Approval, ref: CommandRef, user_id: int | None) -> Published:
    """approval.decided; for a request that ran out of time, approval.expired."""
    return event(
        "approvals",
        "approval.expired" if a.status == "expired" else "approval.decided",
        user_id,
        approvalId=a.id,
        commandId=a.command_id,
        requestId=ref[0] if ref else None,
        sender=ref[1] if ref else None,
        decision=a.status,
        decidedBy=a.decided_by,
        decider=a.decider,
        reason=a.reason,
    )
