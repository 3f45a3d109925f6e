"""The bus actor: the agents' inboxes, read durably (DESIGN §3, §5).

Durable path: each agent appends to its own inbox stream (``XADD
<inbox> * envelope <json>``; ``actors.agents``), and trusted writers, where
``bus.shared_inbox`` is on, to the shared one (``bus.stream``). All are read
in consumer group ``bus.group`` under a consumer name stable for this daemon,
by one XREADGROUP; the sender of an envelope is the inbox it came from:

- at start, this consumer's own pending entries first (a crash left them
  unacknowledged), then new ones (``>``);
- every ``claim_interval``, XAUTOCLAIM (its cursor kept between rounds) takes
  entries pending longer than ``claim_idle`` from any consumer, this one
  included: a dead daemon's entries, or entries whose handling failed;
- an entry is acknowledged only after its effect is committed in
  PostgreSQL. Anything malformed, unknown or oversized, and any entry that has
  failed ``max_deliveries`` times, is moved to ``{bus.stream}:dead`` with its
  reason, delivery count and inbox, in one transaction with its acknowledgement;
- when PostgreSQL (or the cache) is down, the batch in hand waits and is
  retried as it is; when Redis fails, the batches in hand are dropped and
  this consumer's pending entries are read again first: an outage is never
  counted against an entry (``reader``);
- each stream is trimmed to what the group has not finished, and never grows
  past ``max_length``.

Fire-and-forget path: envelopes PUBLISHed on an inbox's channel (of the same
name) are handled the same way, at most once (what cannot be handled is
dead-lettered). A refused envelope of an agent is also told on its replies
channel.

Idempotency: a command's request_id is the envelope id (or data.requestId),
unique per sender in PostgreSQL and written in the same transaction as the
effect, so a redelivery never makes a second row; status reports and
invalidations repeat harmlessly.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from typing import Any, ClassVar, TypeVar

from actors.bus import judge
from actors.bus.published import PublishedReader
from actors.bus.reader import Entry, StreamReader, key_of
from actors.bus.registry import (
    AclState,
    ApplyAgents,
    BusMessage,
    GetAclState,
    Inbox,
    Registry,
    agents_channel,
)
from actors.bus.routes import DependencyDown, Item, Outcome, Router
from actors.bus.store import BusStats, Settler
from actors.cache import CacheRef
from actors.envelope import CommandRequested
from actors.kernel import Health, Ref, handles
from actors.persistence import PersistenceRef
from actors.pubsub import PubSubRef
from actors.redis_link import REDIS_FAILURES, RedisClientActor
from config import BusSettings, PubSubSettings, RedisSettings

__all__ = ["Bus", "BusRef"]

R = TypeVar("R")


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
        persistence: PersistenceRef,
        cache: CacheRef,
        pubsub: PubSubRef | None = None,
        pubsub_settings: PubSubSettings | None = None,
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
        self.registry = Registry(
            prefix=redis_settings.prefix,
            inbox=stream,
            persistence=persistence,
            shared=settings.shared_inbox,
            manage=settings.manage_acls,
            channels=list((pubsub_settings or PubSubSettings()).channels),
            url=url,
            log=self.log,
        )
        self.bus_stats = BusStats()
        self.settler = Settler(
            client=self._client,
            cluster=self.cluster,
            settings=lambda: self.settings,
            inboxes=lambda: self.inboxes,
            stats=self.bus_stats,
            log=self.log,
            dead_stream=f"{stream}:dead",
            consumer=consumer,
        )
        self.reader = StreamReader(
            url=url,
            redis_settings=redis_settings,
            settings=lambda: self.settings,
            client=self._client,
            consumer=consumer,
            log=self.log,
        )
        self._next_claim = 0.0
        self._next_trim = 0.0
        self._next_agents = 0.0
        self._ready = False
        self._outage = False  # a Redis error: the next drain re-reads, it does not deliver
        self.published = (
            PublishedReader(
                pubsub=pubsub,
                name=f"{name}:published",
                inboxes=lambda: self.inboxes,
                settings=lambda: self.settings,
                route=self._route_until_done,
                settler=self.settler,
                stats=self.bus_stats,
                log=self.log,
                halting=self.halting,
                agents_channel=agents_channel(redis_settings.prefix),
                on_agents_notice=self._read_agents_soon,
            )
            if pubsub is not None
            else None
        )

    @property
    def dead_stream(self) -> str:
        return f"{self.stream}:dead"

    @property
    def inboxes(self) -> dict[str, Inbox]:
        return self.registry.inboxes

    @property
    def agents_channel(self) -> str:
        """Told by whichever daemon adds or revokes an agent: read them again."""
        return agents_channel(self.redis_settings.prefix)

    async def on_start(self) -> None:
        await super().on_start()
        if self.settings.shared_inbox:
            self.log.warning(
                "bus_shared_inbox",
                stream=self.stream,
                hint="anyone who can write this stream or channel on the Redis sends as 'inbox'; "
                "give each agent its own inbox (jarvisd agent add) and turn bus.shared_inbox off",
            )

    async def on_stop(self) -> None:
        await self.reader.close()
        await super().on_stop()

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        # Every reader is a task of the actor's: any one failing is the
        # actor's crash (the supervisor restarts them all), never a reader
        # gone silently.
        if self.published is not None:
            self.spawn(self.published.subscription.keep(), "published-subscription")
            self.spawn(self.published.run(), "published")
        await self._stream_loop()

    async def _stream_loop(self) -> None:
        delay = 0.1
        # Inboxes whose pending entries of this consumer are to be read first:
        # every one when (again) ready (nothing is in flight then), only the
        # new ones when inboxes are added (batches may be in flight).
        drain: list[str] = []
        # The next batch is read while this one is handled, and two batches
        # may be handled at once: Redis, Python and PostgreSQL work side by
        # side. A batch with anything but new commands waits for the one
        # before it, so effects on one command still apply in stream order.
        prefetch: asyncio.Task[list[Entry]] | None = None
        running: collections.deque[asyncio.Task[None]] = collections.deque()
        try:
            while not self.halting():
                try:
                    drain = await self._duties(drain)
                    entries = await (prefetch or self._read_new())
                    prefetch = None
                    if entries:
                        prefetch = _owned(self._read_new())
                        after = running[-1] if running else None
                        running.append(_owned(self._handle(entries, None, after)))
                    while running and (len(running) > 1 or not entries):
                        await running.popleft()
                    delay = 0.1
                except REDIS_FAILURES as exc:
                    await _discard(prefetch)
                    prefetch = None
                    while running:
                        await _discard(running.popleft())
                    # Pending entries are read again first (not as deliveries);
                    # a restarted server may have lost the groups and the
                    # agents' ACL users.
                    self._ready = False
                    self._outage = True
                    self.reader.grouped.clear()
                    self.registry.forget_applied()
                    self.bus_stats.last_error = f"{type(exc).__name__}: {exc}"
                    self.bus_stats.redis_errors += 1
                    self.log.warning("bus_redis_error", error=self.bus_stats.last_error)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
                    delay = min(delay * 2, 5.0)
        finally:
            # Entries it read stay pending for this consumer: handled after a restart.
            await _discard(prefetch)
            while running:
                await _discard(running.popleft())

    async def _duties(self, drain: list[str]) -> list[str]:
        """What comes before the next read: the agents, the groups, this
        consumer's pending entries, claims and trimming; returns the inboxes
        still to drain (none)."""
        now = time.monotonic()
        if now >= self._next_agents or not self._ready:
            self._next_agents = now + self.settings.agents_interval
            drain += await self._refresh_inboxes()
        if not self._ready:
            await self.reader.ensure_groups(list(self.inboxes))
            self._ready = True
            drain = list(self.inboxes)
        if drain:
            await self._drain_own_pending(drain, outage=self._outage)
            self._outage = False
        if now >= self._next_claim:
            self._next_claim = now + self.settings.claim_interval
            await self._claim()
        if now >= self._next_trim:
            self._next_trim = now + self.settings.trim_interval
            await self.settler.trim([s for s in self.inboxes if s in self.reader.grouped])
        return []

    async def _refresh_inboxes(self) -> list[str]:
        """Read the agents again; returns the inboxes added. While the
        database does not answer (at start, say), it is asked again each second."""
        changed = await self.registry.refresh(self._client())
        if changed is None:
            self._next_agents = min(self._next_agents, time.monotonic() + 1.0)
            return []
        added, removed = changed
        if added:
            await self.reader.ensure_groups(added)
        self.reader.forget_streams(removed)
        if self.published is not None and (added or removed):
            await self.published.follow(added, removed)
        if removed:
            # A deleted agent's inbox is nobody's now: what is in it goes too.
            await self._client().delete(*removed)
        return added

    def _read_agents_soon(self) -> None:
        """An agent was added or revoked somewhere (or that news may have been missed)."""
        self._next_agents = 0.0

    @handles(GetAclState)
    async def _acl_state(self, _msg: GetAclState) -> AclState:
        return self.registry.state()

    @handles(ApplyAgents)
    async def _apply_agents(self, _msg: ApplyAgents) -> AclState:
        """Agents changed here: apply them now rather than at the next round."""
        self.registry.forget_applied()
        await self._refresh_inboxes()
        return self.registry.state()

    async def _read_new(self) -> list[Entry]:
        streams = [s for s in self.inboxes if s in self.reader.grouped]
        if not streams:  # no agent yet, no shared inbox: nothing to read
            await asyncio.sleep(self.settings.block_ms / 1000)
            return []
        return await self.reader.read(dict.fromkeys(streams, ">"))

    async def _drain_own_pending(self, streams: list[str], *, outage: bool) -> None:
        """This consumer's entries delivered before and never acknowledged."""
        for stream in streams:
            if stream not in self.inboxes:
                continue
            after = "0"
            while not self.halting():
                entries = await self.reader.own_pending(stream, after, outage=outage)
                if not entries:
                    break
                await self._handle(entries, await self.reader.deliveries(entries))
                after = entries[-1][1]

    async def _claim(self) -> None:
        for inbox in list(self.inboxes.values()):
            if inbox.stream not in self.reader.grouped:
                continue
            entries, more = await self.reader.claim(inbox)
            if entries:
                self.bus_stats.claimed += len(entries)
                self.log.info("bus_claimed", count=len(entries), stream=inbox.stream)
                await self._handle(entries, await self.reader.deliveries(entries))
                if more:
                    self._next_claim = 0.0  # more to claim: go on at once

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
        s = self.settings
        batch = judge.sort(
            entries,
            deliveries,
            self.inboxes,
            limit=s.max_deliveries,
            max_bytes=s.max_envelope_bytes,
        )
        items = [item for item, _count in batch.good]
        if after is not None and not all(
            isinstance(env, CommandRequested) for _k, env, _s in items
        ):
            await asyncio.wait({after})
        outcomes = await self._route_until_done(items)
        acked, retried = judge.settle(batch, outcomes, limit=s.max_deliveries)
        self.bus_stats.retried += retried
        await self.settler.settle(acked, batch.dead)
        self.reader.settled([key_of(stream, entry) for stream, entry in acked])

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

    # -- health -------------------------------------------------------------------------------
    async def check(self) -> Health | None:
        health = await super().check()
        if health is None or health.status != "pass":
            return health
        st = self.bus_stats
        detail = (
            f"consumer {self.consumer}, {len(self.inboxes)} inboxes, pending {st.pending}, "
            f"lag {st.lag}"
        )
        if self.registry.manage and not self.registry.managed:
            return Health(
                status="warn",
                detail=f"{detail}; agents' Redis users not managed: {self.registry.error}",
                observed_ms=health.observed_ms,
            )
        return Health(status="pass", detail=detail, observed_ms=health.observed_ms)

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        data["bus"] = {
            "consumer": self.consumer,
            "inboxes": len(self.inboxes),
            "sharedInbox": self.settings.shared_inbox,
            "aclsManaged": self.registry.managed,
            **self.bus_stats.document(),
        }
        return data


def _owned(coro: Any) -> asyncio.Task[Any]:
    """A task of the reading loop's, which awaits or discards it; if the loop
    itself is cancelled past its cleanup (a second cancellation while it
    stops), what the task raised is still retrieved, never left unseen."""
    task = asyncio.get_running_loop().create_task(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def _discard(task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class BusRef(Ref):
    """The bus actor: the agents' Redis users."""

    async def ask(self, msg: BusMessage[R], timeout: float | None = None) -> R:
        return await self._ask(msg, timeout)
