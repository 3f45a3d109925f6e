"""A local receiver of pub/sub messages, and what it receives."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from typing import Literal

import msgspec

__all__ = ["Delivery", "Overflow", "Sink", "Subscriber"]

Overflow = Literal["close", "drop"]
_ids = itertools.count(1)


class Delivery(msgspec.Struct, frozen=True):
    """What a subscriber receives: a message; "down" when the pub/sub actor
    cannot hear Redis (the connection is lost, or its heartbeat does not come
    back); "gap" once it hears again (what was published meanwhile was missed)."""

    kind: Literal["message", "gap", "down"]
    channel: str = ""
    pattern: str | None = None
    data: bytes = b""


_CLOSED = Delivery("gap", data=b"closed")  # the end-of-queue marker, compared by identity


Sink = Callable[[Delivery], bool]


class Subscriber:
    """A local receiver of pub/sub messages: a bounded queue, or a ``sink``
    that takes each delivery at once without waiting (a WebSocket writing to
    its socket's bounded buffer). Either one answers False when it is full;
    then the subscriber is closed (``overflow="close"``: WebSocket clients,
    dropped with a reason, never allowed to slow the others) or loses that
    message (``overflow="drop"``: internal consumers). Both are counted."""

    __slots__ = (
        "_queue",
        "channels",
        "closed",
        "dropped",
        "id",
        "name",
        "on_close",
        "overflow",
        "patterns",
        "sink",
    )

    def __init__(
        self,
        name: str,
        *,
        queue_size: int = 1000,
        overflow: Overflow = "close",
        sink: Sink | None = None,
        on_close: Callable[[str], None] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.name = name
        self.overflow = overflow
        self.sink = sink
        self.on_close = on_close
        # Made only for a subscriber without a sink: a WebSocket's costs none
        # (a queue is four deques, some 3 KB, for each of thousands of sockets).
        self._queue: asyncio.Queue[Delivery] | None = (
            asyncio.Queue(maxsize=queue_size) if sink is None else None
        )
        self.channels: set[str] = set()
        self.patterns: set[str] = set()
        self.closed: str | None = None  # why, once closed
        self.dropped = 0

    @property
    def queue(self) -> asyncio.Queue[Delivery]:
        """The queue of a subscriber without a sink."""
        if self._queue is None:
            raise TypeError(f"subscriber {self.name} has a sink, not a queue")
        return self._queue

    def offer(self, item: Delivery) -> bool:
        """Take ``item`` without waiting; False when there is no room for it."""
        if self.closed is not None:
            return True
        if self.sink is not None:
            return self.sink(item)
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            if self.on_close is not None:
                self.on_close(reason)
            # Wakes a reader waiting on an empty queue; a full one has items
            # to read first, and then finds it closed.
            if self._queue is not None:
                with contextlib.suppress(asyncio.QueueFull):
                    self._queue.put_nowait(_CLOSED)

    async def next(self) -> Delivery | None:
        """The next delivery, or None once the subscriber is closed."""
        if self.closed is not None and self.queue.empty():
            return None
        item = await self.queue.get()
        return None if item is _CLOSED else item
