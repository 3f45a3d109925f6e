"""The sessions actors' messages and replies, and the references that send them."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

from actors.kernel import Message, Ref
from actors.redis_link import RedisUnavailable

__all__ = [
    "Session",
    "SessionConflict",
    "SessionCreate",
    "SessionDelete",
    "SessionGet",
    "SessionKind",
    "SessionList",
    "SessionMessage",
    "SessionNotFound",
    "SessionRevokeAll",
    "SessionRotate",
    "SessionUpdate",
    "SessionsRef",
    "SessionsUnavailable",
]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)  # a message of a reply type is one of any wider type


class SessionNotFound(LookupError):
    """No such session (never existed, expired, deleted or revoked)."""


class SessionConflict(Exception):
    """The session changed since the version the caller read (HTTP 409)."""

    def __init__(self, current: int) -> None:
        super().__init__(f"session was modified (now at version {current})")
        self.current = current


class SessionsUnavailable(RedisUnavailable):
    """Redis cannot be reached (HTTP 503)."""


SessionKind = Literal["login", "app"]


class Session(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    ref: str  # sha256 of the id: safe to show and to log
    kind: SessionKind
    user_id: int
    data: Any
    version: int
    created_ms: int
    last_seen_ms: int
    expires_at_ms: int  # absolute deadline
    id: str | None = None  # only when the session is created or rotated
    # Login sessions: the user's credentials version when it was made (not listed).
    stamp: int | None = None


class SessionMessage(Message[R_co], frozen=True):
    """A message a sessions actor (``sessions`` or ``logins``) answers with ``R``."""


class SessionCreate(SessionMessage[Session], frozen=True):
    """A new session; the reply holds its id (shown once)."""

    user_id: int
    data: Any = None
    idle_ttl: int | None = None  # seconds; defaults from [sessions]
    absolute_ttl: int | None = None
    stamp: int = 0  # login sessions: the user's credentials version


class SessionGet(SessionMessage[Session], frozen=True):
    id: str
    touch: bool = True


class SessionUpdate(SessionMessage[int], frozen=True):
    """Replace the data; replies the new version."""

    id: str
    data: Any
    version: int | None = None  # expected version; None = last write wins


class SessionDelete(SessionMessage[bool], frozen=True):
    """Replies whether the session existed."""

    id: str


class SessionList(SessionMessage[list[Session]], frozen=True):
    user_id: int


class SessionRevokeAll(SessionMessage[int], frozen=True):
    """Replies how many sessions were removed."""

    user_id: int


class SessionRotate(SessionMessage[Session], frozen=True):
    """Move the session to a new id (at login); the old id ends at once."""

    id: str


class SessionsRef(Ref):
    """A sessions actor: ``sessions`` (application sessions) or ``logins``."""

    async def ask(self, msg: SessionMessage[R], timeout: float | None = None) -> R:
        return await self._ask(msg, timeout)
