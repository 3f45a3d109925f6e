"""What the relay is told (``Wake``, by the persistence actor after a commit
that wrote events), apart from the relay itself: the writers need only this."""

from __future__ import annotations

from typing import TypeVar

from actors.kernel import Message, Ref
from actors.outbox.store import Written

__all__ = ["RelayMessage", "RelayRef", "Wake"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class RelayMessage(Message[R_co], frozen=True):
    """A message the relay answers with ``R``."""


class Wake(RelayMessage[None], frozen=True):
    """Events were committed here (as sent, in id order), at ``at``
    (monotonic): sent as they are when they follow the last one relayed,
    else looked for in the outbox now rather than at the next poll."""

    events: tuple[Written, ...]
    at: float


class RelayRef(Ref):
    """The relay: told ``Wake`` after a commit that wrote events."""

    async def ask(self, msg: RelayMessage[R], timeout: float | None = None) -> R:
        return await self._ask(msg, timeout)
