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
  retried as it is: an outage is never counted against an entry;
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
import contextlib
import random
import time
from typing import Any, ClassVar

from redis.exceptions import ResponseError

from actors.bus_agents import AclState, ApplyAgents, GetAclState, Inbox, Registry, agents_channel
from actors.bus_published import PublishedReader
from actors.bus_routes import DependencyDown, Item, Outcome, Router
from actors.bus_store import BusStats, Dead, Settler, text
from actors.envelope import CommandRequested, Malformed, parse
from actors.kernel import Actor, Health, handles
from actors.redis_link import REDIS_FAILURES, RedisClientActor
from config import BusSettings, PubSubSettings, RedisSettings

__all__ = ["AclState", "ApplyAgents", "Bus", "BusStats", "GetAclState"]

# (stream, entry id, fields)
Entry = tuple[str, str, dict[bytes, bytes]]


def key_of(stream: str, entry_id: str) -> str:
    """An entry's name in a batch (entry ids repeat across streams)."""
    return f"{stream}\n{entry_id}"


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
        self.pubsub = pubsub
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
        self._grouped: set[str] = set()
        self._next_claim = 0.0
        self._next_trim = 0.0
        self._next_agents = 0.0
        self._ready = False
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

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        # Both readers belong to the actor: either one failing is the actor's
        # crash (the supervisor restarts both), never a reader gone silently.
        async with asyncio.TaskGroup() as readers:
            readers.create_task(self._stream_loop(), name=f"{self.name}.stream")
            if self.published is not None:
                readers.create_task(self.published.run(), name=f"{self.name}.published")

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
                    now = time.monotonic()
                    if now >= self._next_agents or not self._ready:
                        self._next_agents = now + self.settings.agents_interval
                        drain += await self._refresh_inboxes()
                    if not self._ready:
                        await self._ensure_groups(list(self.inboxes))
                        self._ready = True
                        drain = list(self.inboxes)
                    if drain:
                        await self._drain_own_pending(drain)
                        drain = []
                    if now >= self._next_claim:
                        self._next_claim = now + self.settings.claim_interval
                        await self._claim()
                    if now >= self._next_trim:
                        self._next_trim = now + self.settings.trim_interval
                        streams = [s for s in self.inboxes if s in self._grouped]
                        await self.settler.trim(streams)
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
                    # Pending entries are read again first; a restarted server
                    # may have lost the groups and the agents' ACL users.
                    self._ready = False
                    self._grouped.clear()
                    self.registry.forget_applied()
                    self.bus_stats.last_error = f"{type(exc).__name__}: {exc}"
                    self.log.warning("bus_redis_error", error=self.bus_stats.last_error)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
                    delay = min(delay * 2, 5.0)
        finally:
            # Entries it read stay pending for this consumer: handled after a restart.
            await _discard(prefetch)
            while running:
                await _discard(running.popleft())

    async def _refresh_inboxes(self) -> list[str]:
        """Read the agents again; returns the inboxes added. While the
        database does not answer (at start, say), it is asked again each second."""
        changed = await self.registry.refresh(self._client())
        if changed is None:
            self._next_agents = min(self._next_agents, time.monotonic() + 1.0)
            return []
        added, removed = changed
        if added:
            await self._ensure_groups(added)
        self._grouped.difference_update(removed)
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

    async def _ensure_groups(self, streams: list[str]) -> None:
        client = self._client()
        for stream in streams:
            if stream in self._grouped:
                continue
            # Looked for first: a Redis out of memory refuses XGROUP CREATE
            # even for a group that exists, and the bus must still drain.
            with contextlib.suppress(ResponseError):  # no such stream yet
                groups = await client.xinfo_groups(stream)
                if any(text(g["name"]) == self.settings.group for g in groups):
                    self._grouped.add(stream)
                    continue
            try:
                await client.xgroup_create(stream, self.settings.group, id="0", mkstream=True)
                self.log.info("bus_group_created", stream=stream, group=self.settings.group)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._grouped.add(stream)

    async def _read_new(self) -> list[Entry]:
        streams = [s for s in self.inboxes if s in self._grouped]
        if not streams:  # no agent yet, no shared inbox: nothing to read
            await asyncio.sleep(self.settings.block_ms / 1000)
            return []
        return await self._read(dict.fromkeys(streams, ">"))

    async def _read(self, starts: dict[str, str]) -> list[Entry]:
        block = self.settings.block_ms if ">" in starts.values() else None
        streams: Any = starts
        reply: Any = await self._client().xreadgroup(
            self.settings.group,
            self.consumer,
            streams,
            count=self.settings.batch_size,
            block=block,
        )
        entries: list[Entry] = []
        for stream, items in reply or []:
            name = text(stream)
            for entry_id, fields in items:
                entries.append((name, text(entry_id), fields or {}))
        return entries

    async def _drain_own_pending(self, streams: list[str]) -> None:
        """This consumer's entries delivered before and never acknowledged."""
        for stream in streams:
            if stream not in self.inboxes:
                continue
            after = "0"
            while not self.halting():
                entries = await self._read({stream: after})
                if not entries:
                    break
                await self._handle(entries, await self._deliveries(entries))
                after = entries[-1][1]

    async def _claim(self) -> None:
        idle_ms = int(self.settings.claim_idle * 1000)
        for inbox in list(self.inboxes.values()):
            if inbox.stream not in self._grouped:
                continue
            reply = await self._client().xautoclaim(
                inbox.stream,
                self.settings.group,
                self.consumer,
                idle_ms,
                start_id=inbox.claim_cursor,
                count=self.settings.batch_size,
            )
            cursor, claimed = text(reply[0]), reply[1]
            inbox.claim_cursor = cursor
            entries = [(inbox.stream, text(i), f or {}) for i, f in claimed if f is not None]
            if entries:
                self.bus_stats.claimed += len(entries)
                self.log.info("bus_claimed", count=len(entries), stream=inbox.stream)
                await self._handle(entries, await self._deliveries(entries))
                if cursor != "0-0":
                    self._next_claim = 0.0  # more to claim: go on at once

    async def _deliveries(self, entries: list[Entry]) -> dict[str, int]:
        out: dict[str, int] = {}
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id, _f in entries:
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            rows = await self._client().xpending_range(
                stream,
                self.settings.group,
                min=ids[0],
                max=ids[-1],
                count=len(ids) * 2,
                consumername=self.consumer,
            )
            for r in rows:
                out[key_of(stream, text(r["message_id"]))] = int(r["times_delivered"])
        return out

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
        dead: list[Dead] = []
        good: list[tuple[Item, int]] = []
        limit = self.settings.max_deliveries
        raws: dict[str, bytes] = {}
        for stream, entry_id, fields in entries:
            key = key_of(stream, entry_id)
            count = 1 if deliveries is None else deliveries.get(key, 1)
            raw = fields.get(b"envelope")
            raws[key] = raw or b""
            inbox = self.inboxes.get(stream)
            if inbox is None:
                dead.append(Dead(stream, entry_id, raw or b"", "no such inbox", count))
            elif raw is None:
                dead.append(Dead(stream, entry_id, b"", "malformed: no envelope field", count))
            elif count > limit:
                reason = f"delivered {count} times without being processed"
                dead.append(Dead(stream, entry_id, raw, reason, count))
            else:
                parsed = parse(raw, self.settings.max_envelope_bytes)
                if isinstance(parsed, Malformed):
                    dead.append(Dead(stream, entry_id, raw, parsed.reason, count, parsed.id))
                else:
                    good.append(((key, parsed, inbox.sender), count))
        if after is not None and not all(isinstance(i[1], CommandRequested) for i, _c in good):
            await asyncio.wait({after})
        outcomes = await self._route_until_done([item for item, _c in good])
        acked = [(d.stream, d.entry) for d in dead]
        for (key, env, _sender), count in good:
            stream, _, entry_id = key.partition("\n")
            outcome = outcomes[key]
            if outcome.kind == "done":
                acked.append((stream, entry_id))
            elif outcome.kind == "dead" or count >= limit:
                reason = outcome.reason
                if outcome.kind != "dead":
                    reason = f"{reason} (after {count} deliveries)"
                dead.append(Dead(stream, entry_id, raws[key], reason, count, env.id))
                acked.append((stream, entry_id))
            else:
                self.bus_stats.retried += 1  # left pending: claimed again after claim_idle
        await self.settler.settle(acked, dead)

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
        st = self.bus_stats
        data["bus"] = {
            "consumer": self.consumer,
            "inboxes": len(self.inboxes),
            "sharedInbox": self.settings.shared_inbox,
            "aclsManaged": self.registry.managed,
            "read": st.read,
            "acked": st.acked,
            "dead": st.dead,
            "retried": st.retried,
            "claimed": st.claimed,
            "publishedIn": st.published_in,
            "trimmed": st.trimmed,
            "overMaxLength": st.over_max_length,
            "outages": st.outages,
            "deadLost": st.dead_lost,
            "untold": st.untold,
            "pending": st.pending,
            "lag": st.lag,
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
