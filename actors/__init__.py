"""jarvisd actors: the kernel (mailbox, tell/ask, supervisor) and every actor."""

from actors.kernel import (
    Actor,
    ActorDead,
    ActorError,
    ActorState,
    ActorStopped,
    AskTimeout,
    FatalActorError,
    Health,
    MailboxFull,
    UnknownMessage,
    handles,
)
from actors.supervisor import Escalation, Supervisor

__all__ = [
    "Actor",
    "ActorDead",
    "ActorError",
    "ActorState",
    "ActorStopped",
    "AskTimeout",
    "Escalation",
    "FatalActorError",
    "Health",
    "MailboxFull",
    "Supervisor",
    "UnknownMessage",
    "handles",
]
