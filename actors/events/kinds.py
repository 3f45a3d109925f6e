"""The event types: one struct each for its ``data``, with the type's name
(``TYPE``) and the channel it goes to (``KIND``), and the envelope they
travel in."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

import msgspec

__all__ = [
    "EVENT_TYPES",
    "ApprovalDecided",
    "ApprovalEscalated",
    "ApprovalExpired",
    "ApprovalRequested",
    "ApprovalVote",
    "ApprovalWarning",
    "CommandApproved",
    "CommandCreated",
    "CommandRejected",
    "CommandUpdated",
    "EnvelopeRefused",
    "Event",
    "EventData",
    "EventKind",
    "Published",
]

EventKind = Literal["commands", "approvals"]


class EventData(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The ``data`` of one event type. ``TYPE`` is its ``type``, ``KIND`` the
    channel it goes to beside ``{prefix}events``."""

    TYPE: ClassVar[str]
    KIND: ClassVar[EventKind]


class Event(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An event in the envelope shape agents know."""

    v: int = 1
    id: str
    type: str
    source: str = "jarvisd"
    ts: str
    user_id: int | None = None
    data: EventData


Published = tuple[EventKind, Event]


# -- approvals ---------------------------------------------------------------------------------
class ApprovalRequested(EventData, frozen=True):
    """A request waits for a person's decision."""

    TYPE = "approval.requested"
    KIND = "approvals"
    approval_id: int
    command_id: int | None
    request_id: str | None
    sender: str | None
    action: str
    description: str
    risk_score: int
    risk_category: str
    expires_at: datetime


class ApprovalWarning(EventData, frozen=True):
    """A pending request is about to expire (once per request)."""

    TYPE = "approval.warning"
    KIND = "approvals"
    approval_id: int
    command_id: int | None
    request_id: str | None
    sender: str | None
    action: str
    risk_category: str
    expires_at: datetime


class ApprovalDecided(EventData, frozen=True):
    """A request was approved, rejected or cancelled (``decision``); ``decidedBy``
    is the decider's user id (null for the local admin), ``decider`` their name."""

    TYPE = "approval.decided"
    KIND = "approvals"
    approval_id: int
    command_id: int | None
    request_id: str | None
    sender: str | None
    decision: str
    decided_by: int | None
    decider: str | None
    reason: str | None


class ApprovalExpired(ApprovalDecided, frozen=True):
    """A request ran out of time: ``decision`` is expired, ``decider`` jarvisd."""

    TYPE = "approval.expired"


class ApprovalVote(EventData, frozen=True):
    """A person approved a request that needs more approvals than one: it
    stays pending until ``approvals`` reaches ``approvalsRequired`` (then
    approval.decided follows)."""

    TYPE = "approval.vote"
    KIND = "approvals"
    approval_id: int
    command_id: int | None
    request_id: str | None
    sender: str | None
    by: str
    admin: bool
    reason: str | None
    approvals: int
    approvals_required: int
    admins_required: int


class ApprovalEscalated(EventData, frozen=True):
    """A request waited ``approvals.escalate_after`` without a decision: it
    is announced to a wider group (once per request)."""

    TYPE = "approval.escalated"
    KIND = "approvals"
    approval_id: int
    command_id: int | None
    request_id: str | None
    sender: str | None
    action: str
    description: str
    risk_score: int
    risk_category: str
    requester: str | None
    approvals: int
    approvals_required: int
    created_at: datetime
    expires_at: datetime


# -- commands ----------------------------------------------------------------------------------
class CommandCreated(EventData, frozen=True):
    """A command was recorded (``status`` approved, or awaiting_approval with its ``approvalId``)."""

    TYPE = "command.created"
    KIND = "commands"
    command_id: int
    request_id: str
    sender: str
    status: str
    action: str
    type: str
    source: str
    risk_score: int
    risk_category: str
    approval_id: int | None


class CommandApproved(EventData, frozen=True):
    """A person approved the command's request: the agent may run it."""

    TYPE = "command.approved"
    KIND = "commands"
    command_id: int
    request_id: str
    sender: str
    status: str
    previous: str
    approval_id: int | None


class CommandRejected(CommandApproved, frozen=True):
    """The command's request was rejected or expired (``status`` says which)."""

    TYPE = "command.rejected"


class CommandUpdated(EventData, frozen=True):
    """Any other change of status: progress reports, cancellation."""

    TYPE = "command.updated"
    KIND = "commands"
    command_id: int
    request_id: str
    sender: str
    status: str
    previous: str
    error: str | None
    duration_ms: int | None
    approval_id: int | None


class EnvelopeRefused(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An envelope of the agent's was refused (dead-lettered): why. Sent on
    the agent's replies channel only, as it is (no event envelope)."""

    TYPE: ClassVar[str] = "envelope.refused"
    type: str = "envelope.refused"
    id: str
    entry: str
    path: str
    reason: str
    at: str


EVENT_TYPES: tuple[type[EventData], ...] = (
    ApprovalRequested,
    ApprovalWarning,
    ApprovalDecided,
    ApprovalExpired,
    ApprovalVote,
    ApprovalEscalated,
    CommandCreated,
    CommandApproved,
    CommandRejected,
    CommandUpdated,
)
