"""The records jarvisd keeps and their wire form (camelCase JSON, DESIGN §4, §13).

The same Structs validate HTTP bodies, travel in actor messages and
describe the API in /openapi.json.
"""

from __future__ import annotations

import unicodedata
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
# PostgreSQL text and jsonb cannot hold NUL: text stored there says so in its schema.
NO_NUL = "^[^\x00]*$"
# No control characters or spaces (spelled out: "\s" differs between regex dialects).
Email = Annotated[
    str, msgspec.Meta(max_length=254, pattern=r"^[^@\x00-\x20\x7f]+@[^@\x00-\x20\x7f]+$")
]
Password = Annotated[str, msgspec.Meta(min_length=8, max_length=1024)]
# An action is a name, not a command line: identifier characters, so that no
# spelling (a space, a tab, a zero-width or look-alike letter) slips past the
# risk policy. Surrounding blanks are trimmed and the name is case-folded
# before it is scored or stored (normalize_action).
ACTION_PATTERN = r"^[\t\n\r ]*[A-Za-z0-9][A-Za-z0-9_.:-]*[\t\n\r ]*$"
Action = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=200,
        pattern=ACTION_PATTERN,
        description="a name of letters, digits and _ . : - (case-folded, blanks trimmed)",
    ),
]
# Free text naming where a command came from, as its sender labels it (never authority).
Source = Annotated[str, msgspec.Meta(max_length=100, pattern=NO_NUL)]
Description = Annotated[str, msgspec.Meta(max_length=2000, pattern=NO_NUL)]
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL)]
Score = Annotated[int, msgspec.Meta(ge=0, le=100)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=2000, pattern=NO_NUL)]
# JSON stored as jsonb: any JSON without NUL in its strings or keys. The schema
# refers to a JsonValue component that /openapi.json defines (recursively).
JSON_VALUE_REF = "#/components/schemas/JsonValue"
JsonObject = Annotated[
    dict[str, Any],
    msgspec.Meta(
        extra_json_schema={
            "propertyNames": {"pattern": NO_NUL},
            "additionalProperties": {"$ref": JSON_VALUE_REF},
        }
    ),
]
JsonValue = Annotated[Any, msgspec.Meta(extra_json_schema={"$ref": JSON_VALUE_REF})]
# Row ids are PostgreSQL bigints: anything larger is refused by the schema, not by the database.
RowId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]

# Statuses an agent or an admin may report with PUT /commands/{id}. The others
# (awaiting_approval, approved, rejected, expired) are the approval workflow's
# alone: a status report never decides an approval.
ReportedStatus = Literal["running", "succeeded", "failed", "cancelled"]

# Which statuses a command may come from, for each status it may go to.
COMMAND_TRANSITIONS: dict[str, frozenset[str]] = {
    "awaiting_approval": frozenset({"pending"}),
    "approved": frozenset({"pending", "awaiting_approval"}),
    "rejected": frozenset({"pending", "awaiting_approval"}),
    "expired": frozenset({"awaiting_approval"}),
    "cancelled": frozenset({"pending", "awaiting_approval", "approved"}),
    "running": frozenset({"approved"}),
    # From approved too: an agent that reports only the outcome (no
    # command.started) started implicitly; the history records both steps.
    "succeeded": frozenset({"running", "approved"}),
    "failed": frozenset({"running", "approved"}),
}
# Reports that arrive after the command moved past them: a no-op, as a
# repeated report is (command.started sent beside command.completed on an
# at-most-once path may arrive second).
STALE_REPORTS: dict[str, frozenset[str]] = {"running": frozenset({"succeeded", "failed"})}
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


def normalize_action(action: str) -> str:
    """The form an action is scored and stored in: NFKC, case-folded, trimmed."""
    return unicodedata.normalize("NFKC", action).casefold().strip()


class _HasAction:
    """Mixed into Structs with an ``action``: stored normalised."""

    action: str

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "action", normalize_action(self.action))  # type: ignore[arg-type]


def nul_path(value: Any, path: str = "$") -> str | None:
    """Where ``value`` (decoded JSON) holds a NUL character, which PostgreSQL
    cannot store in text or jsonb; None when nowhere."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return where
        elif isinstance(node, dict):
            for key, item in node.items():
                if isinstance(key, str) and "\x00" in key:
                    return f"{where} (a key)"
                stack.append((item, f"{where}.{key}"))
        elif isinstance(node, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node))
    return None


def digest_sql(expression: str) -> str:
    """SQL for the SHA-256 (hex) of a jsonb value as PostgreSQL stores it. An
    approval is bound to the parameters' digest; taken over the stored form,
    it is the same whoever computes it, for values PostgreSQL rewrites too
    (1e300, -0.0, key order, white space)."""
    return f"encode(sha256(convert_to(({expression})::text, 'UTF8')), 'hex')"


class _Wire(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    pass


class _Input(msgspec.Struct, rename="camel", kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A body whose values are stored in PostgreSQL (which refuses NUL)."""


StoredInput = _Input


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
    preferences: JsonObject = msgspec.field(default_factory=dict)


class UserUpdate(_Input, frozen=True):
    """Only the fields present change. A new password needs the current one
    (``currentPassword``), except when an admin sets someone else's."""

    email: Email | msgspec.UnsetType | None = msgspec.UNSET
    role: Role | msgspec.UnsetType = msgspec.UNSET
    preferences: JsonObject | msgspec.UnsetType = msgspec.UNSET
    disabled: bool | msgspec.UnsetType = msgspec.UNSET
    password: Password | msgspec.UnsetType = msgspec.UNSET
    current_password: Annotated[str, msgspec.Meta(max_length=1024)] | msgspec.UnsetType = (
        msgspec.UNSET
    )


class Token(_Wire, frozen=True):
    """A token carries exactly its user's role: there are no scopes."""

    id: int
    user_id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenCreate(_Input, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=NO_NUL)] = "default"
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
    created_by: int | None = None
    approval_id: int | None = None
    # Who sent it, as the daemon knows it: user:<username> (HTTP API),
    # agent:<name> (its Redis inbox), inbox (the shared inbox). requestIds are per sender.
    sender: str = ""


class CommandCreate(_HasAction, _Input, frozen=True):
    action: Action
    type: CommandType = "api"
    request_id: RequestId | None = None  # the idempotency key; generated when absent
    user_id: RowId | None = None  # on whose behalf (admins, approvers, agents); users: themselves
    source: Source = ""
    parameters: JsonObject = msgspec.field(default_factory=dict)
    description: Description = ""
    risk_score: Score | None = None  # a suggestion: may raise the policy score, never lower it


class CommandStatusUpdate(_Input, frozen=True):
    status: ReportedStatus
    result: JsonValue = None
    error: Annotated[str, msgspec.Meta(max_length=4000, pattern=NO_NUL)] | None = None
    reason: Description | None = None


# -- approvals -------------------------------------------------------------------------------
class Rating(msgspec.Struct, frozen=True):
    """How a request was scored (``rule`` says what gave ``score``) and the
    quorum it needs: ``approvals`` distinct people, ``admins`` of them admins."""

    score: int
    rule: str
    approvals: int = 1
    admins: int = 0


class Vote(_Wire, frozen=True):
    """One person's approval of a request that needs more than one."""

    by: str
    user_id: int | None
    admin: bool
    reason: str | None
    at: datetime


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
    decider: str | None  # who decided, by name (the local admin has no user id)
    decided_at: datetime | None
    reason: str | None
    created_at: datetime
    created_by: int | None = None
    # The context a person decides on: the parameters (a command's are its
    # command's), what gave the score, who asked by name, and who sent it as
    # the daemon knows it (the command's sender, or user:<name>).
    parameters: dict[str, Any] = {}
    score_rule: str | None = None
    requester: str | None = None
    sender: str | None = None
    # The quorum, and the approvals so far (of a request that needs several).
    approvals_required: int = 1
    admins_required: int = 0
    approvals: list[Vote] = []
    escalated_at: datetime | None = None


class ApprovalCreate(_HasAction, _Input, frozen=True):
    """A standalone request. A command's approval request is the one the daemon
    creates with the command; a standalone one never attaches to a command."""

    action: Action
    risk_score: Score
    description: Description = ""
    # Bound by their digest as PostgreSQL stores them: JSON it can store.
    parameters: JsonObject = msgspec.field(default_factory=dict)
    # Seconds; capped at approvals.max_expiry.
    expires_in: Annotated[int, msgspec.Meta(ge=10, le=86400)] | None = None


class Decision(_Input, frozen=True):
    reason: Reason | None = None


class Rejection(_Input, frozen=True):
    reason: Reason


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
    expires_at: float | None = None  # the token's expiry (epoch seconds), if any

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


SYSTEM = Principal(user_id=None, role="admin", name="jarvisd", via="system")
