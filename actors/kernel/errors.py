"""The kernel's own errors: what a sender can be told instead of a reply."""

from __future__ import annotations

__all__ = [
    "ActorDead",
    "ActorError",
    "ActorStopped",
    "AskTimeout",
    "FatalActorError",
    "MailboxFull",
    "UnknownMessage",
]


class ActorError(Exception):
    """Base of the kernel's own errors."""


class MailboxFull(ActorError):
    """The mailbox is at its bound and the sender asked not to wait."""

    def __init__(self, actor: str, size: int) -> None:
        super().__init__(f"mailbox of actor {actor!r} is full ({size} messages)")
        self.actor = actor


class ActorStopped(ActorError):
    """The actor is stopping or stopped and takes no more messages."""

    def __init__(self, actor: str) -> None:
        super().__init__(f"actor {actor!r} is stopped")
        self.actor = actor


class ActorDead(ActorError):
    """The actor crashed; asks pending on it fail at once instead of hanging."""

    def __init__(self, actor: str, reason: str = "") -> None:
        super().__init__(f"actor {actor!r} is down" + (f": {reason}" if reason else ""))
        self.actor = actor


class AskTimeout(ActorError, TimeoutError):
    """No reply within the ask's timeout."""

    def __init__(self, actor: str, timeout: float) -> None:
        super().__init__(f"actor {actor!r} did not answer within {timeout:g}s")
        self.actor = actor


class UnknownMessage(ActorError, TypeError):
    """The actor has no handler for this message type."""


class FatalActorError(ActorError):
    """A failure no restart can fix (missing binary, bad permissions): escalate at once."""
