"""What every room of the persistence actor shares: the message family and
the narrow view of the actor its handlers are given."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Literal, Protocol, TypeVar

import asyncpg

from actors.events import Published
from actors.kernel import Message, Room
from actors.persistence.pool import GuardedPool
from config import ApprovalSettings

__all__ = ["Count", "PgMessage", "Store", "Writing", "room"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)  # a message of a reply type is one of any wider type
Count = Literal["exact", "estimated"] | None


class PgMessage(Message[R_co], frozen=True, kw_only=True):
    """A message the persistence actor answers with ``R``."""


class Writing:
    """A transaction on one connection, and the events it announces: they
    are written into the outbox in the same transaction, before it commits."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.events: list[Published] = []

    def announce(self, published: list[Published]) -> None:
        self.events.extend(published)


class Store(Protocol):
    """The persistence actor as its rooms see it."""

    @property
    def approvals(self) -> ApprovalSettings: ...

    def pool(self) -> GuardedPool:
        """The pool; raises Unavailable while the database is not connected."""
        ...

    def writing(self) -> AbstractAsyncContextManager[Writing]:
        """A transaction whose announced events commit with it (the outbox)."""
        ...


def room(name: str) -> Room[Store]:
    return Room(name)
