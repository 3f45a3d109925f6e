"""Resuming a WebSocket's event channels from an id (``subscribe`` with
``since``): what the socket missed comes from the outbox in PostgreSQL, then
live delivery takes over with no gap and no duplicate.

The live subscription is made first; while the replay runs, live events on
the event channels are held. The replay sends every event after ``since`` in
id order, to each subscribed event channel it belongs to
(``{prefix}events`` takes all, ``{prefix}commands`` and ``{prefix}approvals``
their kind), then the held events follow, and any event whose id a channel
has already had is dropped, there and ever after. A ``since`` older than
what was pruned starts with a ``subscription.gap``.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import msgspec

from actors import persistence as m
from actors.data.model import Principal
from actors.persistence import PersistenceRef
from actors.pubsub import Delivery

__all__ = ["Resume"]

PAGE = 1000


class _Id(msgspec.Struct):
    id: str = ""


_ids = msgspec.json.Decoder(_Id)


def event_id(data: bytes) -> int | None:
    try:
        raw = _ids.decode(data).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return int(raw) if raw.isdigit() else None


@functools.cache
def _channel_kinds(prefix: str) -> dict[str, str]:
    """The event channels of one kind, by name."""
    return {f"{prefix}commands": "commands", f"{prefix}approvals": "approvals"}


class Resume:
    """The event channels' state of one socket: the last id each had, and
    what is held while a replay runs."""

    __slots__ = ("all", "held", "kinds", "replaying", "seen")

    def __init__(self, prefix: str) -> None:
        self.all = f"{prefix}events"
        self.kinds = _channel_kinds(prefix)  # shared: read only
        self.seen: dict[str, int] = {}  # event channel -> the last id it had
        self.replaying = 0  # replays running
        self.held: list[Delivery] = []

    def is_event_channel(self, channel: str) -> bool:
        return channel == self.all or channel in self.kinds

    def admit(self, item: Delivery) -> bool:
        """Whether a live event may go out now; held while a replay runs,
        dropped when its channel had it already."""
        if item.kind != "message" or not self.is_event_channel(item.channel):
            return True
        if self.replaying:
            self.held.append(item)
            return False
        return self._first_time(item)

    def _first_time(self, item: Delivery) -> bool:
        found = event_id(item.data)
        if found is None:
            return True
        if found <= self.seen.get(item.channel, 0):
            return False
        self.seen[item.channel] = found
        return True

    async def pages(
        self, persistence: PersistenceRef, who: Principal, channels: tuple[str, ...], since: int
    ) -> AsyncIterator[tuple[list[Delivery], bool]]:
        """The events after ``since`` for the event channels among
        ``channels``, page by page, as deliveries in id order; and whether
        some after ``since`` were pruned (said with the first page)."""
        wanted = [c for c in channels if self.is_event_channel(c)]
        if not wanted:
            return
        kind = None
        if self.all not in wanted and len(wanted) == 1:
            kind = self.kinds[wanted[0]]
        user_id = who.user_id if who.role == "user" else None
        cursor = since
        while True:
            page = await persistence.ask(
                m.ReadEvents(since=cursor, limit=PAGE, kind=kind, user_id=user_id)  # type: ignore[arg-type]
            )
            out: list[Delivery] = []
            for found, body in page.items:
                event_kind = _kind_of(body)
                for channel in wanted:
                    ours = channel == self.all or self.kinds[channel] == event_kind
                    if ours and found > self.seen.get(channel, since):
                        out.append(Delivery("message", channel, None, body))
                        self.seen[channel] = found
            yield out, cursor == since and since < page.pruned_to
            if len(page.items) < PAGE:
                return
            cursor = page.items[-1][0]

    def release(self) -> list[Delivery]:
        """The live events held during the replay that it did not send."""
        held, self.held = self.held, []
        return [item for item in held if self._first_time(item)]


class _Kind(msgspec.Struct):
    type: str = ""


_kinds = msgspec.json.Decoder(_Kind)


def _kind_of(body: bytes) -> str:
    """commands or approvals, from the event's type (``command.*``, ``approval.*``)."""
    try:
        kind = _kinds.decode(body).type
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""
    return "approvals" if kind.startswith("approval.") else "commands"
