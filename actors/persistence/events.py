"""Reading the event outbox back: the pages a client resuming from an id
is given (``GET /events``, ``jarvisd subscribe --since``)."""

from __future__ import annotations

from typing import Literal

import msgspec

from actors.outbox import wire
from actors.persistence.base import PgMessage, Store, room

__all__ = ["EventPage", "ReadEvents", "events"]

events = room("events")


class EventPage(msgspec.Struct, frozen=True):
    items: list[tuple[int, bytes]]  # (id, the event as sent), in id order
    pruned_to: int  # events up to this id may have been pruned: older is a gap


class ReadEvents(PgMessage[EventPage], frozen=True):
    """Events after ``since``, in id order, at most ``limit``; of one kind,
    and about one user's own commands and requests, when given."""

    since: int
    limit: int
    kind: Literal["commands", "approvals"] | None = None
    user_id: int | None = None  # set: only events about this user's own


@events.handles(ReadEvents)
async def read_events(db: Store, msg: ReadEvents) -> EventPage:
    async with db.pool().acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, body FROM events WHERE id > $1 "
            "AND ($2::text IS NULL OR kind = $2) AND ($3::bigint IS NULL OR user_id = $3) "
            "ORDER BY id LIMIT $4",
            msg.since,
            msg.kind,
            msg.user_id,
            msg.limit,
        )
        pruned = await conn.fetchval("SELECT last_id FROM event_relay WHERE name = 'pruned'")
    return EventPage([(r["id"], wire(r["id"], r["body"])) for r in rows], int(pruned or 0))
