"""The actor kernel (DESIGN §2): messages, actors, typed references.

``actor`` holds the failure contract and the overflow policy of every
mailbox; ``messages`` how a message names its reply and where its handler
lives; ``ref`` how the rest of the process reaches an actor.
"""

from actors.kernel.actor import MAIN_LANE, Actor, ActorState, ActorStats
from actors.kernel.errors import (
    ActorDead,
    ActorError,
    ActorStopped,
    AskTimeout,
    FatalActorError,
    MailboxFull,
    UnknownMessage,
)
from actors.kernel.health import Health, HealthStatus
from actors.kernel.messages import LaneSpec, Message, Room, handles
from actors.kernel.ref import Ref

__all__ = [
    "MAIN_LANE",
    "Actor",
    "ActorDead",
    "ActorError",
    "ActorState",
    "ActorStats",
    "ActorStopped",
    "AskTimeout",
    "FatalActorError",
    "Health",
    "HealthStatus",
    "LaneSpec",
    "MailboxFull",
    "Message",
    "Ref",
    "Room",
    "UnknownMessage",
    "handles",
]
