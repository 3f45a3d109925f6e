"""The events the daemon sends (DESIGN §5), built here and nowhere else.

Each event type is a typed struct: its ``data`` fields are always all there
(null where there is nothing to say), whichever path made the change — the
HTTP API, the agent bus, the CLI, the expiry sweeper. Events about commands
and approvals go to ``{prefix}events`` and to the channel of their kind
(``{prefix}commands``, ``{prefix}approvals``), in the envelope shape agents
know; a refused envelope is told on its agent's replies channel. README's
event table is generated from these structs (``python -m actors.events``),
and a test keeps the two the same.

Agents match events to what they asked for by ``requestId`` and ``sender``
(requestIds are per sender: ``agent:<name>``, ``user:<name>``, ``inbox``).
"""

from __future__ import annotations

import itertools
import secrets
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import msgspec

if TYPE_CHECKING:
    from actors.data.model import Approval, Command, CommandCreate
    from actors.data.repo import Ingested

__all__ = [
    "EVENT_TYPES",
    "ApprovalDecided",
    "ApprovalExpired",
    "ApprovalRequested",
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
    "approval_decided",
    "approval_requested",
    "approval_warning",
    "command_created",
    "command_decided",
    "command_ingested",
    "command_updated",
    "publish",
    "refusal",
    "table",
]

EventKind = Literal["commands", "approvals"]
# The command a request belongs to, as agents know it: (requestId, sender).
CommandRef = tuple[str, str] | None


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
    CommandCreated,
    CommandApproved,
    CommandRejected,
    CommandUpdated,
)

# -- the envelope --------------------------------------------------------------------------------
_last_ts: tuple[int, str] = (0, "")
# Event ids: random per process, then a counter: unique, and cheap to make.
_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count(1)


def now() -> str:
    """The time as ISO 8601 to the millisecond (formatted once per millisecond)."""
    global _last_ts
    ms = time.time_ns() // 1_000_000
    if ms != _last_ts[0]:
        when = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
        _last_ts = (ms, when.replace("+00:00", "Z"))
    return _last_ts[1]


def publish(data: EventData, user_id: int | None) -> Published:
    """``data`` as a new event, with the kind (channel) it belongs to."""
    return data.KIND, Event(
        id=f"{_ID_PREFIX}-{next(_ids):x}", type=data.TYPE, ts=now(), user_id=user_id, data=data
    )


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


# -- README's table ------------------------------------------------------------------------------
def _fields(kind: type[msgspec.Struct], *, skip: str = "") -> str:
    names = [f.encode_name for f in msgspec.structs.fields(kind) if f.encode_name != skip]
    return ", ".join(f"`{n}`" for n in names)


def _meaning(kind: type) -> str:
    return " ".join((kind.__doc__ or "").split()).replace("``", "`")


def table(prefix: str = "jarvis:") -> str:
    """The Markdown table of every event, as README shows it."""
    rows = ["| channel | type | when | data |", "|---|---|---|---|"]
    for kind in EVENT_TYPES:
        rows.append(
            f"| `{prefix}{kind.KIND}` | `{kind.TYPE}` | {_meaning(kind)} | {_fields(kind)} |"
        )
    rows.append(
        f"| `{prefix}inbox:NAME:replies` | `{EnvelopeRefused.TYPE}` | "
        f"{_meaning(EnvelopeRefused)} | {_fields(EnvelopeRefused, skip='type')} |"
    )
    return "\n".join(rows) + "\n"


def _main(argv: Any = None) -> None:
    print(table(), end="")


if __name__ == "__main__":
    _main()
