"""What every room of the persistence actor shares: the message family and
the narrow view of the actor its handlers are given."""

from __future__ import annotations

from bisect import bisect_left
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import asyncpg

from actors.data.model import Rating, risk_category
from actors.events import Published
from actors.kernel import Message, Room
from actors.persistence.pool import GuardedPool
from config import ApprovalSettings

__all__ = [
    "AGE_BUCKETS",
    "Count",
    "Durations",
    "PgMessage",
    "Store",
    "Writing",
    "rate",
    "room",
]

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


# The ratings given under the policy in force (a reload brings a new policy
# object, and forgets them); at most _RATED actions at a time.
_rated: tuple[ApprovalSettings | None, dict[tuple[str, int], Rating]] = (None, {})
_RATED = 4096


def rate(policy: ApprovalSettings, action: str, asked: int | None) -> Rating:
    """The score of ``action`` (the policy's, or the requester's ``asked``
    when higher), what gave it, and the quorum of its category. Remembered
    per policy: the bus rates every command it reads, mostly the same few."""
    global _rated
    if _rated[0] is not policy:
        _rated = (policy, {})
    known = _rated[1]
    key = (action, asked or 0)
    found = known.get(key)
    if found is None:
        score, rule = policy.explain(action, asked or 0)
        quorum = policy.quorum_of(risk_category(score))
        found = Rating(score, rule, quorum.approvals, quorum.admins or 0)
        if len(known) >= _RATED:
            known.clear()
        known[key] = found
    return found


# Seconds: how long requests wait for a decision, and how old pending ones are.
AGE_BUCKETS = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
    86400.0,
)


@dataclass
class Durations:
    """A histogram of durations over AGE_BUCKETS."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(AGE_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(AGE_BUCKETS, seconds)] += 1
        self.total += max(seconds, 0.0)

    def doc(self) -> dict[str, Any]:
        """Cumulative counts by bound (the last one +Inf), the sum, the count."""
        running, cumulative = 0, []
        for c in self.counts:
            running += c
            cumulative.append(running)
        return {"buckets": cumulative, "sum": round(self.total, 3), "count": running}


class Store(Protocol):
    """The persistence actor as its rooms see it."""

    @property
    def approvals(self) -> ApprovalSettings: ...

    @property
    def decision_seconds(self) -> dict[str, Durations]:
        """Time from request to decision, by outcome, of the decisions made here."""
        ...

    def pool(self) -> GuardedPool:
        """The pool; raises Unavailable while the database is not connected."""
        ...

    def writing(self) -> AbstractAsyncContextManager[Writing]:
        """A transaction whose announced events commit with it (the outbox)."""
        ...


def room(name: str) -> Room[Store]:
    return Room(name)
