"""The records jarvisd keeps and their wire form (camelCase JSON, DESIGN §4, §13).

The same Structs validate HTTP bodies, travel in actor messages and
describe the API in /openapi.json.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec

Role = Literal["admin", "approver", "user", "agent"]
CommandType = Literal["voice", "text", "api", "scheduled", "agent"]
CommandStatus = Literal[
    "pending",
    "awaiting_approval",
    "approved",
    "rejected",
    "expired",
    "cancelled",
    "running",
    "succeeded",
    "failed",
]
ApprovalStatus = Literal["pending", "approved", "rejected", "expired", "cancelled"]
RiskCategory = Literal["LOW", "MEDIUM", "HIGH", "CRITICAL"]

Username = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$",
        description="1-64 of A-Z a-z 0-9 _ . @ -, unique ignoring case",
    ),
]
Email = Annotated[str, msgspec.Meta(max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")]
Password = Annotated[str, msgspec.Meta(min_length=8, max_length=1024)]
Action = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Description = Annotated[str, msgspec.Meta(max_length=2000)]
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Score = Annotated[int, msgspec.Meta(ge=0, le=100)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]

# Which statuses a command may come from, for each status it may go to.
COMMAND_TRANSITIONS: dict[str, frozenset[str]] = {
    "awaiting_approval": frozenset({"pending"}),
    "approved": frozenset({"pending", "awaiting_approval"}),
    "rejected": frozenset({"pending", "awaiting_approval"}),
    "expired": frozenset({"awaiting_approval"}),
    "cancelled": frozenset({"pending", "awaiting_approval", "approved"}),
    "running": frozenset({"approved"}),
    "succeeded": frozenset({"running"}),
    "failed": frozenset({"running"}),
}
APPROVAL_FINAL: frozenset[str] = frozenset({"approved", "rejected", "expired", "cancelled"})


def risk_category(score: int) -> RiskCategory:
    """LOW < 40 <= MEDIUM < 70 <= HIGH < 90 <= CRITICAL (DESIGN §6)."""
    if score < 40:
        return "LOW"
    if score < 70:
        return "MEDIUM"
    if score < 90:
        return "HIGH"
    return "CRITICAL"


def parameters_digest(parameters: Any) -> str:
    """A stable SHA-256 of the parameters: an approval is bound to exactly these."""
    canonical = msgspec.json.encode(parameters, order="sorted")
    return hashlib.sha256(canonical).hexdigest()


class _Wire(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    pass


class _Input(msgspec.Struct, rename="camel", kw_only=True, frozen=True, forbid_unknown_fields=True):
    pass


# -- users and tokens ----------------------------------------------------------------
class User(_Wire, frozen=True):
    id: int
    username: str
    email: str | None
    role: Role
    preferences: dict[str, Any]
    disabled: bool
    created_at: datetime
    updated_at: datetime
    last_login_at: datetime | None


class UserCreate(_Input, frozen=True):
    username: Username
    role: Role = "user"
    email: Email | None = None
    password: Password | None = None
    preferences: dict[str, Any] = msgspec.field(default_factory=dict)


class UserUpdate(_Input, frozen=True):
    """Only the fields present change."""

    email: Email | msgspec.UnsetType | None = msgspec.UNSET
    role: Role | msgspec.UnsetType = msgspec.UNSET
    preferences: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    disabled: bool | msgspec.UnsetType = msgspec.UNSET
    password: Password | msgspec.UnsetType = msgspec.UNSET


class Token(_Wire, frozen=True):
    id: int
    user_id: int
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenCreate(_Input, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] = "default"
    scopes: list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]] = msgspec.field(
        default_factory=list
    )
    expires_in: Annotated[int, msgspec.Meta(ge=60, le=10 * 365 * 86400)] | None = None


class TokenCreated(_Wire, frozen=True):
    """The token itself is shown once, here, and never again."""

    token: str
    info: Token


# -- commands ---------------------------------------------------------------------------
class Command(_Wire, frozen=True):
    id: int
    request_id: str
    user_id: int | None
    source: str
    type: CommandType
    action: str
    parameters: dict[str, Any]
    description: str
    status: CommandStatus
    risk_score: int
    risk_category: RiskCategory
    result: Any
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    approval_id: int | None = None


class CommandCreate(_Input, frozen=True):
    action: Action
    type: CommandType = "api"
    request_id: RequestId | None = None  # the idempotency key; generated when absent
    user_id: int | None = None  # on whose behalf (admins and agents); others: themselves
    source: Annotated[str, msgspec.Meta(max_length=100)] = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    description: Description = ""
    risk_score: Score | None = None  # a suggestion: may raise the policy score, never lower it


class CommandStatusUpdate(_Input, frozen=True):
    status: CommandStatus
    result: Any = None
    error: Annotated[str, msgspec.Meta(max_length=4000)] | None = None
    reason: Description | None = None


# -- approvals -------------------------------------------------------------------------------
class Approval(_Wire, frozen=True):
    id: int
    command_id: int | None
    requester_id: int | None
    action: str
    description: str
    parameters_digest: str
    risk_score: int
    risk_category: RiskCategory
    status: ApprovalStatus
    expires_at: datetime
    decided_by: int | None
    decided_at: datetime | None
    reason: str | None
    created_at: datetime


class ApprovalCreate(_Input, frozen=True):
    action: Action
    risk_score: Score
    description: Description = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    command_id: int | None = None
    expires_in: Annotated[int, msgspec.Meta(ge=10, le=86400)] | None = None


class Decision(_Input, frozen=True):
    reason: Reason | None = None


# -- lists ---------------------------------------------------------------------------------------
T = TypeVar("T")


class Page(_Wire, Generic[T], frozen=True):
    items: list[T]
    next_cursor: str | None
    count: int | None = None


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who is asking: a user by token or session, or the local admin (Unix socket peer)."""

    user_id: int | None
    role: Role
    name: str
    via: Literal["token", "session", "peer", "system"]
    token_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


SYSTEM = Principal(user_id=None, role="admin", name="jarvisd", via="system")
