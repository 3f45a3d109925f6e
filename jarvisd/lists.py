"""The list cache: recent answers of GET /commands and GET /approvals, kept
briefly so that pollers repeating a query cost no database round trip.

- An answer is kept at most ``http.list_cache_ttl`` seconds, keyed by the
  route, the caller's visibility (everything, or one user's own rows) and the
  exact query, and is dropped by any change to commands or approvals: one
  made through this daemon's API (dropped before the change is answered), or
  relayed as events by any daemon (the agent bus included): the relay tells
  ``{prefix}internal:changes`` once per batch, after the batch's events.
- It is used only while that channel is subscribed; when the pub/sub
  connection is down it is emptied and bypassed, as the principal cache is.
- An answer computed while a change happened is not stored (generation).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict

from actors.pubsub import Delivery

__all__ = ["ListCache"]

Key = tuple[str, int | None, str, str]


class ListCache:
    def __init__(self, *, size: int = 1000, ttl: float = 1.0) -> None:
        self.size = size
        self.ttl = ttl
        self.enabled = False
        self.generation = 0
        self._entries: OrderedDict[Key, tuple[float, bytes, dict[str, str] | None]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        # Long-polls of GET /events, woken by the next change.
        self._waiters: set[asyncio.Future[None]] = set()

    def get(self, key: Key) -> tuple[bytes, dict[str, str] | None] | None:
        if not self.enabled or self.ttl <= 0:
            return None
        found = self._entries.get(key)
        if found is None or found[0] <= time.monotonic():
            if found is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self.hits += 1
        return found[1], found[2]

    def put(self, key: Key, body: bytes, headers: dict[str, str] | None, generation: int) -> None:
        if not self.enabled or self.ttl <= 0 or generation != self.generation:
            return
        self._entries[key] = (time.monotonic() + self.ttl, body, headers)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def changed(self) -> None:
        """Commands or approvals changed: forget every answer, wake the waiters."""
        self.generation += 1
        self._entries.clear()
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    async def next_change(self, timeout: float) -> None:
        """Until the next change (or an outage) is heard, at most ``timeout``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.discard(fut)

    def on_delivery(self, item: Delivery) -> bool:
        """The subscriber of ``{prefix}internal:changes``: any batch of events, a gap or an outage
        empties the cache; it is used again once the connection is back."""
        self.changed()
        if item.kind == "down":
            self.enabled = False
        elif item.kind == "gap":
            self.enabled = True
        return True

    def enable(self) -> None:
        self.changed()
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False
        self.changed()

    def stats(self) -> dict[str, int | bool]:
        return {
            "enabled": self.enabled,
            "entries": len(self._entries),
            "hits": self.hits,
            "misses": self.misses,
        }
