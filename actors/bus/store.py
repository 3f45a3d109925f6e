"""What the bus writes beside the commands (DESIGN §5): acknowledgements,
dead letters, refusals told to agents, and trimmed streams."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from actors import events
from actors.redis_link import REDIS_FAILURES
from config import BusSettings

__all__ = [
    "TRIM_ROUND",
    "TRIM_STEP",
    "Dead",
    "dead_fields",
    "refusal",
    "stream_id",
    "text",
    "xtrim",
]

# Entries one XTRIM may drop, and one trim round at most (a round holds up
# the reading loop; 1,000,000 per bus.trim_interval is far above any ingest).
TRIM_STEP = 50_000
TRIM_ROUND = 1_000_000


@dataclass
class BusStats:
    read: int = 0
    acked: int = 0
    dead: int = 0
    retried: int = 0
    claimed: int = 0
    published_in: int = 0
    trimmed: int = 0
    over_max_length: int = 0
    outages: int = 0  # PostgreSQL or the cache down while a batch waited
    redis_errors: int = 0  # Redis errors of the reading loop
    dead_lost: int = 0  # dead letters Redis refused (out of memory): the log has them
    untold: int = 0  # refusals that could not be told on an agent's replies channel
    pending: int | None = None
    lag: int | None = None
    last_error: str = ""

    def document(self) -> dict[str, Any]:
        """The counters for /stats and /metrics."""
        return {
            "read": self.read,
            "acked": self.acked,
            "dead": self.dead,
            "retried": self.retried,
            "claimed": self.claimed,
            "publishedIn": self.published_in,
            "trimmed": self.trimmed,
            "overMaxLength": self.over_max_length,
            "outages": self.outages,
            "redisErrors": self.redis_errors,
            "deadLost": self.dead_lost,
            "untold": self.untold,
            "pending": self.pending,
            "lag": self.lag,
        }


class Dead(msgspec.Struct, frozen=True):
    """An envelope that can never be handled: where it came from, and why."""

    stream: str  # the inbox (stream or channel) it arrived on
    entry: str  # its stream entry id ("" on the PUBLISH path)
    raw: bytes
    reason: str
    count: int
    id: str = ""  # the envelope's id, where it could be read


# A dead letter keeps the envelope's first bytes (the reason is the record;
# the envelope is its sender's own): an agent filling the dead-letter stream
# with large envelopes costs at most bus.dead_max_length times this.
DEAD_ENVELOPE_BYTES = 8192


def dead_fields(d: Dead, path: str, consumer: str) -> dict[Any, Any]:
    return {
        "envelope": d.raw[:DEAD_ENVELOPE_BYTES],
        "reason": d.reason[:1000],
        "deliveries": d.count,
        "entry": d.entry,
        "inbox": d.stream,
        "path": path,
        "consumer": consumer,
        "at": _now(),
    }


def refusal(d: Dead, path: str) -> bytes:
    """What the agent hears on its replies channel."""
    return events.refusal(d.id, d.entry, path, d.reason)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def xtrim(client: Any, stream: str, **how: Any) -> int:
    """XTRIM ~ in steps until nothing more goes. One XTRIM ~ drops at most
    its LIMIT (Redis' default: 10,000), less than one trim interval's
    ingest under load: trimming once per interval, the stream would keep
    what was long finished (hundreds of MB after a flood)."""
    total = 0
    while total < TRIM_ROUND:
        n = int(await client.xtrim(stream, approximate=True, limit=TRIM_STEP, **how))
        if n == 0:
            break
        total += n
    return total


def stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms or 0), int(seq or 0)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Settler:
    """Settles what the bus read: acknowledges entries and dead-letters the
    ones that can never be handled (in one transaction on one server), tells
    each agent why on its replies channel, and trims the inboxes."""

    def __init__(
        self,
        *,
        client: Callable[[], Any],
        cluster: bool,
        settings: Callable[[], BusSettings],
        inboxes: Callable[[], dict[str, Any]],
        stats: BusStats,
        log: Any,
        dead_stream: str,
        consumer: str,
    ) -> None:
        self._client = client
        self.cluster = cluster
        self._settings = settings  # read each time: SIGHUP may change them
        self._inboxes = inboxes
        self.stats = stats
        self.log = log
        self.dead_stream = dead_stream
        self.consumer = consumer

    async def settle(self, acked: list[tuple[str, str]], dead: list[Dead]) -> None:
        """Dead-letter, then acknowledge; then tell the agents. A dead entry
        is also deleted from its inbox at once (its dead letter keeps what
        matters): an agent's refused envelopes do not wait for the trim."""
        if not acked:
            return
        client, group = self._client(), self._settings().group
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in acked:
            by_stream.setdefault(stream, []).append(entry_id)
        gone: dict[str, list[str]] = {}
        for d in dead:
            gone.setdefault(d.stream, []).append(d.entry)
        if self.cluster:
            # The dead-letter stream sits in another slot: the dead letters
            # first, acknowledged by Redis, then the acknowledgement (a crash
            # between them at worst dead-letters an entry twice; never loses one).
            if dead:
                await self._dead_letters(client, dead)
            for stream, ids in by_stream.items():
                await client.xack(stream, group, *ids)
                if gone.get(stream):
                    await client.xdel(stream, *gone[stream])
        else:  # one transaction
            try:
                async with client.pipeline(transaction=True) as pipe:
                    self._queue(pipe, dead, "stream")
                    self._ack(pipe, by_stream, gone, group)
                    await pipe.execute()
            except ResponseError as exc:
                if not dead:
                    raise
                # Redis refused a dead letter (out of memory, say): what
                # cannot be handled must still leave the inbox, or it waits
                # there for ever; the reasons stay in the log.
                self.stats.dead_lost += len(dead)
                self.log.error("bus_dead_letters_lost", count=len(dead), error=str(exc)[:200])
                async with client.pipeline(transaction=True) as pipe:
                    self._ack(pipe, by_stream, gone, group)
                    await pipe.execute()
        self.stats.acked += len(acked)
        self._count(dead)
        await self._tell(dead, "stream")

    @staticmethod
    def _ack(
        pipe: Any, acked: dict[str, list[str]], gone: dict[str, list[str]], group: str
    ) -> None:
        for stream, ids in acked.items():
            pipe.xack(stream, group, *ids)
            if gone.get(stream):
                pipe.xdel(stream, *gone[stream])

    async def _dead_letters(self, client: Any, dead: list[Dead]) -> None:
        try:
            async with client.pipeline(transaction=False) as pipe:
                self._queue(pipe, dead, "stream")
                await pipe.execute()
        except ResponseError as exc:  # refused (out of memory): see settle
            self.stats.dead_lost += len(dead)
            self.log.error("bus_dead_letters_lost", count=len(dead), error=str(exc)[:200])

    async def dead_letter_published(self, dead: list[Dead]) -> None:
        """The fire-and-forget path's refusals: nothing to acknowledge, and
        a dead letter that cannot be written is logged, never retried."""
        try:
            async with self._client().pipeline(transaction=False) as pipe:
                self._queue(pipe, dead, "publish")
                await pipe.execute()
        except REDIS_FAILURES as exc:
            self.log.warning("bus_dead_letter_failed", count=len(dead), error=repr(exc))
        self._count(dead)
        await self._tell(dead, "publish")

    def _count(self, dead: list[Dead]) -> None:
        self.stats.dead += len(dead)
        for d in dead:
            self.log.warning(
                "bus_dead_letter",
                inbox=d.stream,
                entry=d.entry,
                reason=d.reason,
                deliveries=d.count,
            )

    def _queue(self, pipe: Any, dead: list[Dead], path: str) -> None:
        for d in dead:
            pipe.xadd(
                self.dead_stream,
                dead_fields(d, path, self.consumer),
                maxlen=self._settings().dead_max_length,
                approximate=True,
            )

    async def _tell(self, dead: list[Dead], path: str) -> None:
        """Tell each agent why its envelopes were refused, on its replies
        channel. A notification: the dead letter is the record; one that
        cannot be told is counted, never retried."""
        inboxes = self._inboxes()
        told = [
            (inbox.replies, refusal(d, path))
            for d in dead
            if (inbox := inboxes.get(d.stream)) is not None and inbox.replies is not None
        ]
        if not told:
            return
        try:
            if self.cluster:  # a cluster pipeline cannot route PUBLISH (no key)
                for channel, message in told:
                    await self._client().publish(channel, message)
            else:
                async with self._client().pipeline(transaction=False) as pipe:
                    for channel, message in told:
                        pipe.publish(channel, message)
                    await pipe.execute()
        except REDIS_FAILURES as exc:
            self.stats.untold += len(told)
            self.log.warning("bus_refusals_not_told", count=len(told), error=repr(exc))

    async def trim(self, streams: list[str]) -> None:
        """Drop what the group has finished; cap the rest at max_length."""
        client, settings = self._client(), self._settings()
        pending = lag = 0
        for stream in streams:
            groups = await client.xinfo_groups(stream)
            mine = next((g for g in groups if text(g["name"]) == settings.group), None)
            if mine is None:
                continue
            pending += int(mine.get("pending") or 0)
            lag += int(mine.get("lag") or 0)
            floor = text(mine["last-delivered-id"])
            summary = await client.xpending(stream, settings.group)
            if summary and summary.get("pending") and summary.get("min"):
                floor = min(floor, text(summary["min"]), key=stream_id)
            trimmed = await xtrim(client, stream, minid=floor)
            length = int(await client.xlen(stream))
            if length > settings.max_length:
                self.stats.over_max_length += 1
                self.log.warning(
                    "bus_stream_over_max_length",
                    stream=stream,
                    length=length,
                    max_length=settings.max_length,
                )
                trimmed += await xtrim(client, stream, maxlen=settings.max_length)
            self.stats.trimmed += trimmed
        self.stats.pending, self.stats.lag = pending, lag
