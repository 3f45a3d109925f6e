"""The persistence actor (``actor``) and its messages, each defined beside
the handler that answers it: ``users``, ``tokens``, ``agents``,
``commands``, ``approvals``, ``events`` (the outbox read back)."""

from actors.persistence.actor import Persistence, PersistenceRef
from actors.persistence.agents import CreateAgent, ListAgents, RevokeAgent
from actors.persistence.approvals import (
    ApprovalHistory,
    CreateApproval,
    DecideApproval,
    GetApproval,
    ListApprovals,
    PendingAges,
    SweepApprovals,
    Swept,
)
from actors.persistence.base import AGE_BUCKETS, Durations, PgMessage
from actors.persistence.commands import (
    CreateCommand,
    GetCommand,
    IngestCommands,
    ListCommands,
    ReportCommand,
    UpdateCommandStatus,
)
from actors.persistence.events import EventPage, ReadEvents
from actors.persistence.pool import Unavailable
from actors.persistence.tokens import (
    AuthenticateToken,
    AuthenticateUser,
    CreateToken,
    ListTokens,
    RevokeToken,
)
from actors.persistence.users import (
    CheckPassword,
    CreateUser,
    CredentialStamp,
    DeleteUser,
    EnsureAdmin,
    GetUser,
    GetUserByName,
    ListUsers,
    RotateSessionKey,
    SessionKey,
    UpdateUser,
)

__all__ = [
    "AGE_BUCKETS",
    "ApprovalHistory",
    "AuthenticateToken",
    "AuthenticateUser",
    "CheckPassword",
    "CreateAgent",
    "CreateApproval",
    "CreateCommand",
    "CreateToken",
    "CreateUser",
    "CredentialStamp",
    "DecideApproval",
    "DeleteUser",
    "Durations",
    "EnsureAdmin",
    "EventPage",
    "GetApproval",
    "GetCommand",
    "GetUser",
    "GetUserByName",
    "IngestCommands",
    "ListAgents",
    "ListApprovals",
    "ListCommands",
    "ListTokens",
    "ListUsers",
    "PendingAges",
    "Persistence",
    "PersistenceRef",
    "PgMessage",
    "ReadEvents",
    "ReportCommand",
    "RevokeAgent",
    "RevokeToken",
    "RotateSessionKey",
    "SessionKey",
    "SweepApprovals",
    "Swept",
    "Unavailable",
    "UpdateCommandStatus",
    "UpdateUser",
]
