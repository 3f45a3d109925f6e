"""jarvisd actors: the kernel (messages, mailboxes, typed references,
supervisor) and every actor."""

from actors.kernel import (
    Actor,
    ActorDead,
    ActorError,
    ActorState,
    ActorStopped,
    AskTimeout,
    FatalActorError,
    Health,
    LaneSpec,
    MailboxFull,
    Message,
    Ref,
    Room,
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
    "LaneSpec",
    "MailboxFull",
    "Message",
    "Ref",
    "Room",
    "Supervisor",
    "UnknownMessage",
    "handles",
]
