"""The events the daemon sends (DESIGN §5): their types (``kinds``), and
the one module that builds them (``build``).

Each event type is a typed struct: its ``data`` fields are always all there
(null where there is nothing to say), whichever path made the change — the
HTTP API, the agent bus, the CLI, the expiry sweeper. Events about commands
and approvals go to ``{prefix}events`` and to the channel of their kind
(``{prefix}commands``, ``{prefix}approvals``), in the envelope shape agents
know; a refused envelope is told on its agent's replies channel. docs/agents.md's
event table is generated from these structs (``python -m actors.events``),
and a test keeps the two the same.

Agents match events to what they asked for by ``requestId`` and ``sender``
(requestIds are per sender: ``agent:<name>``, ``user:<name>``, ``inbox``).
"""

from actors.events.build import (
    approval_decided,
    approval_escalated,
    approval_requested,
    approval_vote,
    approval_warning,
    command_created,
    command_decided,
    command_ingested,
    command_updated,
    now,
    publish,
    refusal,
)
from actors.events.kinds import (
    EVENT_TYPES,
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
    EventKind,
    Published,
)
from actors.events.table import table

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
    "table",
]
