"""The persistence actor's message API for users, tokens, commands and approvals.

List messages carry an already-validated ListQuery (parsed at the edge, so a
bad parameter is a 400 before any SQL runs) and the count mode.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from actors.data.model import (
    ApprovalCreate,
    CommandCreate,
    CommandStatusUpdate,
    Principal,
    TokenCreate,
    UserCreate,
    UserUpdate,
)

Count = Literal["exact", "estimated"] | None


class _Msg(msgspec.Struct, frozen=True, kw_only=True):
    pass


class CreateUser(_Msg, frozen=True):
    new: UserCreate


class GetUser(_Msg, frozen=True):
    user_id: int


class GetUserByName(_Msg, frozen=True):
    username: str


class ListUsers(_Msg, frozen=True):
    query: Any  # ListQuery
    count: Count = None
    as_json: bool = False  # items as JSON written by PostgreSQL (repo.JsonPage)


class UpdateUser(_Msg, frozen=True):
    user_id: int
    change: UserUpdate
    # A new password is accepted only with the right change.current_password
    # (when the user has a password): the API sets this unless an admin resets
    # someone else's.
    verify_current: bool = False


class DeleteUser(_Msg, frozen=True):
    user_id: int


class CheckPassword(_Msg, frozen=True):
    """Replies (Principal, credentials version) when the password is right
    and the user enabled, else None. The version is raised whenever the
    user's password or disabled state changes (see CredentialStamp)."""

    username: str
    password: str


class CredentialStamp(_Msg, frozen=True):
    """Replies the user's credentials version now, or None for an unknown user:
    a login compares it with CheckPassword's to notice a change made meanwhile."""

    user_id: int


class SessionKey(_Msg, frozen=True):
    """Replies the key login session records are signed with (bytes)."""


class RotateSessionKey(_Msg, frozen=True):
    """Replace the login session key: every login session ends."""


class CreateToken(_Msg, frozen=True):
    user_id: int
    new: TokenCreate
    max_live: int = 100  # auth.max_tokens_per_user


class ListTokens(_Msg, frozen=True):
    user_id: int


class RevokeToken(_Msg, frozen=True):
    token_id: int
    user_id: int | None = None  # None: any user's (admins)


class AuthenticateToken(_Msg, frozen=True):
    token: str


class AuthenticateUser(_Msg, frozen=True):
    """Replies the Principal of an enabled user whose credentials version is
    still ``credentials_version`` (when given), else None (session authentication)."""

    user_id: int
    via: Literal["session"] = "session"
    credentials_version: int | None = None


class CreateCommand(_Msg, frozen=True):
    """Replies (Command, created)."""

    new: CommandCreate
    user_id: int | None
    created_by: int | None = None
    sender: str = "inbox"  # whose requestId namespace (Command.sender)


class GetCommand(_Msg, frozen=True):
    command_id: int


class ListCommands(_Msg, frozen=True):
    query: Any
    count: Count = None
    as_json: bool = False


class UpdateCommandStatus(_Msg, frozen=True):
    command_id: int
    change: CommandStatusUpdate
    actor_id: int | None
    actor_name: str = "jarvisd"
    sent_by: int | None = None  # set: only a command this user sent (Forbidden otherwise)


class IngestCommands(_Msg, frozen=True):
    """The batched ingest path (agent bus): replies one repo.Ingested per row.
    A row: the command, on whose behalf, who sent it (user id, sender)."""

    rows: tuple[tuple[CommandCreate, int | None, int | None, str], ...]


class ReportCommand(_Msg, frozen=True):
    """A status report naming the command by id or by the requestId it was
    created with (agents know the latter); replies the Command."""

    change: CommandStatusUpdate
    command_id: int | None = None
    request_id: str | None = None
    duration_ms: int | None = None  # as measured by the agent
    actor_name: str = "bus"  # who reported, for the audit trail
    actor_id: int | None = None  # the reporting agent's user id, if it has one
    sender: str = "inbox"  # only this sender's commands are found


class CreateApproval(_Msg, frozen=True):
    new: ApprovalCreate
    requester_id: int | None


class GetApproval(_Msg, frozen=True):
    approval_id: int


class ListApprovals(_Msg, frozen=True):
    query: Any
    count: Count = None
    as_json: bool = False


class DecideApproval(_Msg, frozen=True):
    approval_id: int
    decision: Literal["approved", "rejected", "cancelled"]
    who: Principal
    reason: str | None = None


class EnsureAdmin(_Msg, frozen=True):
    """First start: create user ``username`` as admin with a token if no admin
    exists. Replies the TokenCreated, or None when an admin already exists."""

    username: str = "admin"


class CreateAgent(_Msg, frozen=True):
    """Give ``name`` Redis credentials (a new agent user, or a revoked one
    again); replies (repo.Agent, password)."""

    name: str


class ListAgents(_Msg, frozen=True):
    """Replies every agent (revoked ones too) as repo.Agent."""


class RevokeAgent(_Msg, frozen=True):
    """End an agent's Redis credentials; replies the repo.Agent."""

    name: str
