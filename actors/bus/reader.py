"""How the bus reads its inboxes from Redis: the consumer group, this
consumer's pending entries, claims, and how many times each entry was
delivered.

Blocking reads (``XREADGROUP … BLOCK bus.block_ms``) go through a client of
their own, whose reply timeout is longer than the block: on the ordinary
client (``redis.connect_timeout``) a block longer than the timeout would end
in a timeout error every time Redis had nothing to say.

Deliveries are Redis' count (XPENDING), less the reads that only an outage
caused: after a Redis error the bus reads this consumer's pending entries
again before new ones, and such a read is not a delivery, so that Redis
blips never dead-letter a valid envelope (the count is kept in memory: a
restart of the bus counts the re-read, as a crash may be the envelope's doing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from actors.bus.registry import Inbox
from actors.bus.store import text
from actors.redis_link import REDIS_FAILURES, RedisClient, connect_redis
from config import BusSettings, RedisSettings

__all__ = ["Entry", "StreamReader", "key_of"]

# (stream, entry id, fields)
Entry = tuple[str, str, dict[bytes, bytes]]


def key_of(stream: str, entry_id: str) -> str:
    """An entry's name in a batch (entry ids repeat across streams)."""
    return f"{stream}\n{entry_id}"


class StreamReader:
    def __init__(
        self,
        *,
        url: str,
        redis_settings: RedisSettings,
        settings: Callable[[], BusSettings],
        client: Callable[[], RedisClient],
        consumer: str,
        log: Any,
    ) -> None:
        self.url = url
        self.redis_settings = redis_settings
        self._settings = settings
        self._client = client
        self.consumer = consumer
        self.log = log
        self.grouped: set[str] = set()
        self._blocking: RedisClient | None = None
        self._blocking_ms = 0
        # Entry key -> reads of it that an outage caused (not deliveries).
        self._not_deliveries: dict[str, int] = {}

    async def close(self) -> None:
        client, self._blocking = self._blocking, None
        if client is not None:
            with contextlib.suppress(*REDIS_FAILURES):
                await client.aclose()

    async def _reads(self) -> RedisClient:
        """The client for XREADGROUP: its reply timeout outlasts the block
        (made again when bus.block_ms is reloaded)."""
        block = self._settings().block_ms
        if self._blocking is None or block != self._blocking_ms:
            old, self._blocking_ms = self._blocking, block
            self._blocking = connect_redis(
                self.url,
                self.redis_settings,
                name="jarvisd-bus-reader",
                read_timeout=block / 1000 + self.redis_settings.connect_timeout + 1.0,
            )
            if old is not None:
                with contextlib.suppress(*REDIS_FAILURES):
                    await old.aclose()
        return self._blocking

    async def ensure_groups(self, streams: list[str]) -> None:
        client, group = self._client(), self._settings().group
        for stream in streams:
            if stream in self.grouped:
                continue
            # Looked for first: a Redis out of memory refuses XGROUP CREATE
            # even for a group that exists, and the bus must still drain.
            with contextlib.suppress(ResponseError):  # no such stream yet
                groups = await client.xinfo_groups(stream)
                if any(text(g["name"]) == group for g in groups):
                    self.grouped.add(stream)
                    continue
            try:
                await client.xgroup_create(stream, group, id="0", mkstream=True)
                self.log.info("bus_group_created", stream=stream, group=group)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self.grouped.add(stream)

    async def read(self, starts: dict[str, str]) -> list[Entry]:
        """XREADGROUP from ``starts`` (stream -> id; ``>`` blocks for new ones)."""
        s = self._settings()
        block = s.block_ms if ">" in starts.values() else None
        streams: Any = starts
        reader = await self._reads()
        reply: Any = await reader.xreadgroup(
            s.group, self.consumer, streams, count=s.batch_size, block=block
        )
        entries: list[Entry] = []
        for stream, items in reply or []:
            name = text(stream)
            for entry_id, fields in items:
                entries.append((name, text(entry_id), fields or {}))
        return entries

    async def own_pending(self, stream: str, after: str, *, outage: bool) -> list[Entry]:
        """This consumer's entries after ``after`` delivered before and never
        acknowledged; with ``outage``, this read is not a delivery of them."""
        entries = await self.read({stream: after})
        if outage:
            for s, entry_id, _f in entries:
                key = key_of(s, entry_id)
                self._not_deliveries[key] = self._not_deliveries.get(key, 0) + 1
        return entries

    async def claim(self, inbox: Inbox) -> tuple[list[Entry], bool]:
        """XAUTOCLAIM of entries idle past bus.claim_idle (any consumer's);
        returns them, and whether there may be more to claim."""
        s = self._settings()
        reply = await self._client().xautoclaim(
            inbox.stream,
            s.group,
            self.consumer,
            int(s.claim_idle * 1000),
            start_id=inbox.claim_cursor,
            count=s.batch_size,
        )
        cursor, claimed = text(reply[0]), reply[1]
        inbox.claim_cursor = cursor
        entries = [(inbox.stream, text(i), f or {}) for i, f in claimed if f is not None]
        return entries, cursor != "0-0"

    async def deliveries(self, entries: list[Entry]) -> dict[str, int]:
        """How many times each entry was delivered (outages' re-reads aside)."""
        out: dict[str, int] = {}
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id, _f in entries:
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            rows = await self._client().xpending_range(
                stream,
                self._settings().group,
                min=ids[0],
                max=ids[-1],
                count=len(ids) * 2,
                consumername=self.consumer,
            )
            for r in rows:
                key = key_of(stream, text(r["message_id"]))
                delivered = int(r["times_delivered"]) - self._not_deliveries.get(key, 0)
                out[key] = max(delivered, 1)
        return out

    def settled(self, keys: list[str]) -> None:
        """These entries left the inbox (acknowledged or dead-lettered)."""
        for key in keys:
            self._not_deliveries.pop(key, None)

    def forget_streams(self, streams: list[str]) -> None:
        """Streams no longer read (their agents are gone)."""
        self.grouped.difference_update(streams)
        gone = tuple(f"{s}\n" for s in streams)
        if gone:
            for key in [k for k in self._not_deliveries if k.startswith(gone)]:
                del self._not_deliveries[key]
