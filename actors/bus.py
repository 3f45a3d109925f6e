"""The bus actor: the agents' inbox, read durably (DESIGN §3, §5).

Durable path: the stream ``bus.stream`` (``XADD jarvis:inbox * envelope
<json>``), read in consumer group ``bus.group`` under a consumer name stable
for this daemon:

- at start, this consumer's own pending entries first (a crash left them
  unacknowledged), then new ones (``>``);
- every ``claim_interval``, XAUTOCLAIM (its cursor kept between rounds) takes
  entries pending longer than ``claim_idle`` from any consumer, this one
  included: a dead daemon's entries, or entries whose handling failed;
- an entry is acknowledged only after its effect is committed in
  PostgreSQL. Anything malformed, unknown or oversized, and any entry that has
  failed ``max_deliveries`` times, is moved to ``{stream}:dead`` with its
  reason and delivery count, in one transaction with its acknowledgement;
- when PostgreSQL (or the cache) is down, the batch in hand waits and is
  retried as it is: an outage is never counted against an entry;
- the stream is trimmed to what the group has not finished, and never grows
  past ``max_length``.

Fire-and-forget path: envelopes PUBLISHed on the channel of the same name are
handled the same way, at most once (what cannot be handled is dead-lettered).

Idempotency: a command's request_id is the envelope id (or data.requestId),
unique in PostgreSQL and written in the same transaction as the effect, so a
redelivery never makes a second row; status reports and invalidations repeat
harmlessly.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from redis.exceptions import ResponseError

from actors.bus_routes import SHARED, DependencyDown, Item, Outcome, Router
from actors.envelope import CommandRequested, Envelope, Malformed, parse
from actors.kernel import Actor, Health
from actors.pubsub import Delivery, Detach, Subscribe, Subscriber
from actors.redis_link import REDIS_FAILURES, RedisClientActor
from config import BusSettings, RedisSettings

__all__ = ["Bus", "BusStats"]

Entry = tuple[str, dict[bytes, bytes]]
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
    outages: int = 0
    pending: int | None = None
    lag: int | None = None
    last_error: str = ""


class Bus(RedisClientActor):
    client_name: ClassVar[str] = "jarvisd-bus"

    def __init__(
        self,
        redis_settings: RedisSettings,
        settings: BusSettings,
        url: str,
        *,
        stream: str,
        consumer: str,
        persistence: Actor,
        cache: Actor,
        pubsub: Actor | None = None,
        name: str = "bus",
        health_interval: float = 2.0,
    ) -> None:
        super().__init__(
            name, redis_settings, url, mailbox_size=16, health_interval=health_interval
        )
        self.settings = settings
        self.stream = stream
        self.consumer = consumer
        self.router = Router(persistence, cache)
        self.pubsub = pubsub
        self.bus_stats = BusStats()
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_trim = 0.0
        self._ready = False

    @property
    def dead_stream(self) -> str:
        return f"{self.stream}:dead"

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        # Both readers belong to the actor: either one failing is the actor's
        # crash (the supervisor restarts both), never a reader gone silently.
        async with asyncio.TaskGroup() as readers:
            readers.create_task(self._stream_loop(), name=f"{self.name}.stream")
            if self.pubsub is not None:
                readers.create_task(self._published_loop(), name=f"{self.name}.published")

    async def _stream_loop(self) -> None:
        delay = 0.1
        own_pending = True
        # The next batch is read while this one is handled, and two batches
        # may be handled at once: Redis, Python and PostgreSQL work side by
        # side. A batch with anything but new commands waits for the one
        # before it, so effects on one command still apply in stream order.
        prefetch: asyncio.Task[list[Entry]] | None = None
        running: collections.deque[asyncio.Task[None]] = collections.deque()
        try:
            while not self.halting():
                try:
                    if not self._ready:
                        await self._ensure_group()
                        own_pending = True
                    if own_pending:
                        await self._drain_own_pending()
                        own_pending = False
                    now = time.monotonic()
                    if now >= self._next_claim:
                        self._next_claim = now + self.settings.claim_interval
                        await self._claim()
                    if now >= self._next_trim:
                        self._next_trim = now + self.settings.trim_interval
                        await self._trim()
                    entries = await (prefetch or self._read(">"))
                    prefetch = None
                    if entries:
                        loop = asyncio.get_running_loop()
                        prefetch = loop.create_task(self._read(">"))
                        after = running[-1] if running else None
                        running.append(loop.create_task(self._handle(entries, None, after)))
                    while running and (len(running) > 1 or not entries):
                        await running.popleft()
                    delay = 0.1
                except REDIS_FAILURES as exc:
                    await _discard(prefetch)
                    prefetch = None
                    while running:
                        await _discard(running.popleft())
                    self._ready = not _lost_group(exc) and self._ready
                    self.bus_stats.last_error = f"{type(exc).__name__}: {exc}"
                    self.log.warning("bus_redis_error", error=self.bus_stats.last_error)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
                    delay = min(delay * 2, 5.0)
        finally:
            # Entries it read stay pending for this consumer: handled after a restart.
            await _discard(prefetch)
            while running:
                await _discard(running.popleft())

    async def _ensure_group(self) -> None:
        try:
            await self._client().xgroup_create(
                self.stream, self.settings.group, id="0", mkstream=True
            )
            self.log.info("bus_group_created", stream=self.stream, group=self.settings.group)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._ready = True

    async def _read(self, start: str) -> list[Entry]:
        block = self.settings.block_ms if start == ">" else None
        reply: Any = await self._client().xreadgroup(
            self.settings.group,
            self.consumer,
            {self.stream: start},
            count=self.settings.batch_size,
            block=block,
        )
        entries: list[Entry] = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                entries.append((_text(entry_id), fields or {}))
        return entries

    async def _drain_own_pending(self) -> None:
        """This consumer's entries delivered before and never acknowledged."""
        after = "0"
        while not self.halting():
            entries = await self._read(after)
            if not entries:
                return
            await self._handle(entries, await self._deliveries([e[0] for e in entries]))
            after = entries[-1][0]

    async def _claim(self) -> None:
        idle_ms = int(self.settings.claim_idle * 1000)
        reply = await self._client().xautoclaim(
            self.stream,
            self.settings.group,
            self.consumer,
            idle_ms,
            start_id=self._claim_cursor,
            count=self.settings.batch_size,
        )
        cursor, claimed = _text(reply[0]), reply[1]
        self._claim_cursor = cursor
        entries = [(_text(i), f or {}) for i, f in claimed if f is not None]
        if entries:
            self.bus_stats.claimed += len(entries)
            self.log.info("bus_claimed", count=len(entries))
            await self._handle(entries, await self._deliveries([e[0] for e in entries]))
            if cursor != "0-0":
                self._next_claim = 0.0  # more to claim: go on at once

    async def _deliveries(self, ids: list[str]) -> dict[str, int]:
        rows = await self._client().xpending_range(
            self.stream,
            self.settings.group,
            min=ids[0],
            max=ids[-1],
            count=len(ids) * 2,
            consumername=self.consumer,
        )
        return {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}

    # -- one batch --------------------------------------------------------------------------
    async def _handle(
        self,
        entries: list[Entry],
        deliveries: dict[str, int] | None,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        """Parse, route and settle one batch. ``after`` is the batch before it,
        still being handled: unless this one holds only new commands, it waits
        for that one first."""
        self.bus_stats.read += len(entries)
        dead: list[tuple[str, bytes, str, int]] = []
        good: list[tuple[str, Envelope, int]] = []
        limit = self.settings.max_deliveries
        for entry_id, fields in entries:
            count = 1 if deliveries is None else deliveries.get(entry_id, 1)
            raw = fields.get(b"envelope")
            if raw is None:
                dead.append((entry_id, b"", "malformed: no envelope field", count))
            elif count > limit:
                reason = f"delivered {count} times without being processed"
                dead.append((entry_id, raw, reason, count))
            else:
                parsed = parse(raw, self.settings.max_envelope_bytes)
                if isinstance(parsed, Malformed):
                    dead.append((entry_id, raw, parsed.reason, count))
                else:
                    good.append((entry_id, parsed, count))
        if after is not None and not all(isinstance(env, CommandRequested) for _i, env, _c in good):
            await asyncio.wait({after})
        outcomes = await self._route_until_done([(i, env, SHARED) for i, env, _c in good])
        acked = [entry_id for entry_id, *_rest in dead]
        raws = {entry_id: fields.get(b"envelope", b"") for entry_id, fields in entries}
        for entry_id, _env, count in good:
            outcome = outcomes[entry_id]
            if outcome.kind == "done":
                acked.append(entry_id)
            elif outcome.kind == "dead" or count >= limit:
                reason = outcome.reason
                if outcome.kind != "dead":
                    reason = f"{reason} (after {count} deliveries)"
                dead.append((entry_id, raws[entry_id], reason, count))
                acked.append(entry_id)
            else:
                self.bus_stats.retried += 1  # left pending: claimed again after claim_idle
        await self._settle(acked, dead)

    async def _route_until_done(self, items: list[Item]) -> dict[str, Outcome]:
        """Route the batch; while a dependency is down, wait and try the same
        batch again (its entries are not redelivered meanwhile)."""
        delay = 0.2
        while True:
            try:
                return await self.router.route(items)
            except DependencyDown as exc:
                self.bus_stats.outages += 1
                self.bus_stats.last_error = str(exc)
                self.log.warning("bus_waiting_for_dependency", error=str(exc), retry_in=delay)
                if self.halting():
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _settle(self, acked: list[str], dead: list[tuple[str, bytes, str, int]]) -> None:
        """Dead-letter and acknowledge."""
        if not acked:
            return
        client = self._client()
        if self.cluster:
            # The two streams sit in different slots: the dead letters first,
            # acknowledged by Redis, then the acknowledgement (a crash between
            # them at worst dead-letters an entry twice; never loses one).
            if dead:
                async with client.pipeline(transaction=False) as pipe:
                    self._queue_dead(pipe, dead)
                    await pipe.execute()
            await client.xack(self.stream, self.settings.group, *acked)
        else:  # one transaction
            async with client.pipeline(transaction=True) as pipe:
                self._queue_dead(pipe, dead)
                pipe.xack(self.stream, self.settings.group, *acked)
                await pipe.execute()
        self.bus_stats.acked += len(acked)
        self.bus_stats.dead += len(dead)
        for entry_id, _raw, reason, count in dead:
            self.log.warning("bus_dead_letter", entry=entry_id, reason=reason, deliveries=count)

    def _queue_dead(self, pipe: Any, dead: list[tuple[str, bytes, str, int]]) -> None:
        for entry_id, raw, reason, count in dead:
            pipe.xadd(
                self.dead_stream,
                _dead_fields(raw, reason, count, entry_id, "stream", self.consumer),
                maxlen=self.settings.dead_max_length,
                approximate=True,
            )

    # -- the fire-and-forget path --------------------------------------------------------------
    async def _published_loop(self) -> None:
        assert self.pubsub is not None
        sub = Subscriber(f"{self.name}:published", queue_size=10_000, overflow="drop")
        try:
            await self._subscribe(sub)
            while not self.halting():
                first = await sub.next()
                if first is None:  # the pubsub actor let it go (stopping): subscribe again
                    sub = Subscriber(f"{self.name}:published", queue_size=10_000, overflow="drop")
                    await self._subscribe(sub)
                    continue
                batch = [first]
                while len(batch) < self.settings.batch_size and not sub.queue.empty():
                    batch.append(sub.queue.get_nowait())
                await self._handle_published(batch)
        finally:
            try:
                await self.pubsub.ask(Detach(sub), timeout=2)
            except Exception as exc:  # stopping: the pubsub actor may be gone already
                self.log.debug("bus_detach_failed", error=repr(exc))

    async def _subscribe(self, sub: Subscriber) -> None:
        assert self.pubsub is not None
        delay = 0.1
        while not self.halting():
            try:
                await self.pubsub.ask(Subscribe(sub, channels=(self.stream,)), timeout=10)
                return
            except Exception as exc:  # not connected yet: try again
                self.log.debug("bus_subscribe_retry", error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _handle_published(self, batch: list[Delivery]) -> None:
        dead: list[tuple[str, bytes, str, int]] = []
        good: list[Item] = []
        for n, item in enumerate(batch):
            if item.kind != "message":  # down, then gap: envelopes PUBLISHed meanwhile are lost
                self.log.warning(
                    f"bus_published_{item.kind}", detail=item.data.decode(errors="replace")
                )
                continue
            self.bus_stats.published_in += 1
            parsed = parse(item.data, self.settings.max_envelope_bytes)
            if isinstance(parsed, Malformed):
                dead.append((f"published-{n}", item.data, parsed.reason, 1))
            else:
                good.append((f"published-{n}", parsed, SHARED))
        raws = {f"published-{n}": item.data for n, item in enumerate(batch)}
        outcomes = await self._route_until_done(good)
        for key, _env, _sender in good:
            outcome = outcomes[key]
            if outcome.kind != "done":  # at most once: nothing is retried
                dead.append((key, raws[key], outcome.reason, 1))
        if dead:
            try:
                async with self._client().pipeline(transaction=False) as pipe:
                    for _key, raw, reason, count in dead:
                        pipe.xadd(
                            self.dead_stream,
                            _dead_fields(raw, reason, count, "", "publish", self.consumer),
                            maxlen=self.settings.dead_max_length,
                            approximate=True,
                        )
                    await pipe.execute()
            except REDIS_FAILURES as exc:
                self.log.warning("bus_dead_letter_failed", count=len(dead), error=repr(exc))
            self.bus_stats.dead += len(dead)

    # -- trimming and health -------------------------------------------------------------------
    async def _trim(self) -> None:
        """Drop what the group has finished; cap the rest at max_length."""
        client = self._client()
        groups = await client.xinfo_groups(self.stream)
        mine = next((g for g in groups if _text(g["name"]) == self.settings.group), None)
        if mine is None:
            return
        self.bus_stats.pending = int(mine.get("pending") or 0)
        lag = mine.get("lag")
        self.bus_stats.lag = None if lag is None else int(lag)
        floor = _text(mine["last-delivered-id"])
        summary = await client.xpending(self.stream, self.settings.group)
        if summary and summary.get("pending") and summary.get("min"):
            floor = min(floor, _text(summary["min"]), key=_stream_id)
        trimmed = await self._xtrim(client, minid=floor)
        length = int(await client.xlen(self.stream))
        if length > self.settings.max_length:
            self.bus_stats.over_max_length += 1
            self.log.warning(
                "bus_stream_over_max_length", length=length, max_length=self.settings.max_length
            )
            trimmed += await self._xtrim(client, maxlen=self.settings.max_length)
        self.bus_stats.trimmed += trimmed

    async def _xtrim(self, client: Any, **how: Any) -> int:
        """XTRIM ~ in steps until nothing more goes. One XTRIM ~ drops at most
        its LIMIT (Redis' default: 10,000), less than one trim interval's
        ingest under load: trimming once per interval, the stream would keep
        what was long finished (hundreds of MB after a flood)."""
        total = 0
        while total < TRIM_ROUND:
            n = int(await client.xtrim(self.stream, approximate=True, limit=TRIM_STEP, **how))
            if n == 0:
                break
            total += n
        return total

    async def check(self) -> Health | None:
        health = await super().check()
        if health is None or health.status != "pass":
            return health
        st = self.bus_stats
        detail = f"consumer {self.consumer}, pending {st.pending}, lag {st.lag}"
        return Health(status="pass", detail=detail, observed_ms=health.observed_ms)

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        st = self.bus_stats
        data["bus"] = {
            "consumer": self.consumer,
            "read": st.read,
            "acked": st.acked,
            "dead": st.dead,
            "retried": st.retried,
            "claimed": st.claimed,
            "publishedIn": st.published_in,
            "trimmed": st.trimmed,
            "overMaxLength": st.over_max_length,
            "outages": st.outages,
            "pending": st.pending,
            "lag": st.lag,
        }
        return data


async def _discard(task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _dead_fields(
    raw: bytes, reason: str, count: int, entry_id: str, path: str, consumer: str
) -> dict[Any, Any]:
    return {
        "envelope": raw[:65_536],
        "reason": reason[:1000],
        "deliveries": count,
        "entry": entry_id,
        "path": path,
        "consumer": consumer,
        "at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


def _lost_group(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms or 0), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
