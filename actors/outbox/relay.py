"""The relay: events from the outbox to Redis, in id order, at least once,
by one daemon at a time.

The leader (a session advisory lock on a connection of its own, as the
approvals sweeper leads) reads the events past the last one it relayed,
publishes them (each to ``{prefix}events`` and its kind's channel, in order,
``events.relay_batch`` to a round trip), and records how far it got in
``event_relay`` as it reads the next batch (or once a poll). Events this
daemon committed are handed over with their ``Wake`` as they are sent: when
they follow the last one relayed (no id missing) they go out without being
read back; anything else (another daemon's commits, a gap, a full mailbox)
is read from the outbox. A crash or a Redis failure before that record sends
them again: subscribers know an event by its id. The relay wakes on the
notification each writing commit sends (LISTEN on the lock's connection), on
a ``Wake`` from this daemon's persistence actor, and every
``events.poll_interval``. The leader also prunes events older than
``events.retention`` (relayed ones only), in batches.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from actors.kernel import Actor, ActorError, Health, handles
from actors.leadership import CONNECTION_LOST, Leadership, lock_key
from actors.outbox.relay_messages import RelayRef, Wake
from actors.outbox.store import NOTIFY_CHANNEL, Written, wire
from actors.pubsub import PubSubRef, RelayEvents
from actors.redis_link import RedisUnavailable
from config import EventSettings, PostgresSettings

__all__ = ["RELAY_LOCK", "Relay", "RelayRef", "Wake", "prune_batch"]

RELAY_LOCK = lock_key("jarvisd.event-relay")
PRUNE_EVERY = 60.0  # seconds between pruning rounds
PRUNE_BATCH = 10_000
_RETRY = 0.5  # seconds before trying again after a failure


@dataclass
class RelayStats:
    relayed: int = 0
    last_id: int = 0  # the last event published (recorded with the next read)
    newest_id: int = 0  # the newest event seen in the outbox
    pruned: int = 0
    failures: int = 0
    last_error: str = ""
    # Commit (its notification heard) to published, in ms, for the newest
    # notifications this relay heard as leader (the last 10,000).
    lags: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=10_000))

    def lag(self, q: float) -> float | None:
        if not self.lags:
            return None
        ordered = sorted(self.lags)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


class NotSent(Exception):
    """Redis (or the pub/sub actor) did not take a batch: it is sent again."""


class Relay(Actor):
    def __init__(
        self,
        settings: EventSettings,
        postgres: PostgresSettings,
        dsn: str,
        *,
        pubsub: PubSubRef,
        name: str = "relay",
        health_interval: float = 2.0,
    ) -> None:
        super().__init__(name, mailbox_size=1000, health_interval=health_interval)
        self.settings = settings
        self.pubsub = pubsub
        self.relay_stats = RelayStats()
        self.lead = Leadership(dsn, postgres, RELAY_LOCK, self._lead)
        self._wake = asyncio.Event()
        self._listening: asyncpg.Connection | None = None
        self._pruned_at = 0.0
        self._proved = 0.0  # when the lock was last proved on its connection
        # (highest id of a commit, when it was first told), oldest first.
        self._heard: collections.deque[tuple[int, float]] = collections.deque(maxlen=100_000)
        # Events handed over by this daemon's commits, not yet relayed; a
        # bound: past it the oldest go, and are read from the outbox instead.
        self._handed: collections.deque[Written] = collections.deque(maxlen=10_000)
        self._recorded_at = 0.0  # when event_relay last had how far it got
        self._read_at = 0.0  # when the outbox was last read

    @handles(Wake)
    async def _woken(self, msg: Wake) -> None:
        if msg.events and self.lead.leader:
            self._handed.extend(msg.events)
            self._commit_seen(msg.events[-1][0], msg.at)
        self._wake.set()

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload.isdigit():
            self._commit_seen(int(payload), time.monotonic())
        self._wake.set()

    def _commit_seen(self, top: int, at: float) -> None:
        """A commit's highest id, first told at ``at`` (its Wake here, else
        its notification): the lag is measured from then."""
        st = self.relay_stats
        if top > st.newest_id:
            st.newest_id = top
            self._heard.append((top, at))

    def _lead(self, leading: bool) -> None:
        self.log.info("relay_leading" if leading else "relay_standing_by")

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        if not self.settings.relay:
            self.log.info("relay_off", reason="events.relay = false: another daemon relays")
            await asyncio.Event().wait()  # nothing to do for as long as the actor runs
        while not self.halting():
            pause = self.settings.poll_interval
            # Cleared before looking: a commit told while a batch is on its
            # way wakes the next turn at once.
            self._wake.clear()
            try:
                if not await self._leading():
                    # Standing by: another daemon relays; try for the lock
                    # once a poll, whatever commits here wake.
                    await asyncio.sleep(self.settings.poll_interval)
                    continue
                sent = await self._relay_batch()
                st = self.relay_stats
                if sent and (
                    sent >= self.settings.relay_batch or self._handed or st.newest_id > st.last_id
                ):
                    pause = 0.0  # more known to be waiting: no pause
                self.relay_stats.last_error = ""  # relaying: what failed before is over
                await self._prune()
            except asyncpg.UndefinedTableError:  # the outbox's migration is not applied yet
                self.log.debug("relay_waiting", reason="the events table is not there yet")
                # The first commit's Wake ends the wait: the daemon's first
                # events go out as they are made, not a retry later.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _RETRY)
                continue
            except CONNECTION_LOST as exc:
                self._failed(exc)
                await self.lead.drop()
                await asyncio.sleep(_RETRY)  # however many commits wake it meanwhile
                continue
            except NotSent as exc:  # not recorded as relayed: sent again
                self._failed(exc)
                await asyncio.sleep(_RETRY)
                continue
            if pause:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)

    def _failed(self, exc: BaseException) -> None:
        self.relay_stats.failures += 1
        self.relay_stats.last_error = f"{type(exc).__name__}: {exc}"
        self.log.warning("relay_failed", error=self.relay_stats.last_error)

    async def _leading(self) -> bool:
        """Lead, and on a new lock connection listen and read how far the
        last leader got. The lock is proved on its connection at most once a
        poll interval: a session lock goes only with its session, and a
        closed connection is seen at once."""
        conn = self.lead.conn
        if (
            self.lead.leader
            and conn is not None
            and not conn.is_closed()
            and conn is self._listening
            and time.monotonic() - self._proved < self.settings.poll_interval
        ):
            return True
        if not await self.lead.leading():
            return False
        self._proved = time.monotonic()
        conn = self.lead.conn
        assert conn is not None
        if self._listening is not conn:
            # What this connection writes is how far the relay got (and
            # pruning): losing the last of it in a crash only sends a batch
            # again, so its commits do not wait for the disk.
            await conn.execute("SET synchronous_commit = off")
            await conn.add_listener(NOTIFY_CHANNEL, self._notified)
            self._listening = conn
            self._read_at = 0.0  # a new leader reads at once
            self.relay_stats.last_id = int(
                await conn.fetchval("SELECT last_id FROM event_relay WHERE name = 'redis'")
            )
        return True

    async def _relay_batch(self) -> int:
        batch = self._next_handed()
        if batch:
            # Handed over by this daemon's commits, following the last one
            # sent: no need to read them back.
            await self._send(batch)
            if time.monotonic() - self._recorded_at >= self.settings.poll_interval:
                await self._record()  # how far it got: once a poll interval at most
            return len(batch)
        st = self.relay_stats
        if (
            st.newest_id <= st.last_id
            and time.monotonic() - self._read_at < self.settings.poll_interval
        ):
            # Nothing known to wait (a notification of what was handed over
            # and sent already): the outbox is read at the poll.
            return 0
        conn = self.lead.conn
        assert conn is not None
        # One round trip: how far the last batch got is recorded as the next
        # one is read (a crash sends at most that batch again).
        rows = await conn.fetch(
            "WITH mark AS (UPDATE event_relay SET last_id = $1 "
            "WHERE name = 'redis' AND last_id < $1) "
            "SELECT id, kind, body FROM events WHERE id > $1 ORDER BY id LIMIT $2",
            self.relay_stats.last_id,
            self.settings.relay_batch,
        )
        self._recorded_at = self._read_at = time.monotonic()
        if not rows:
            return 0
        await self._send([(r["id"], r["kind"], wire(r["id"], r["body"])) for r in rows])
        return len(rows)

    def _next_handed(self) -> list[Written]:
        """The events handed over that follow the last one sent, in a run
        with no id missing, up to a batch."""
        handed, last = self._handed, self.relay_stats.last_id
        while handed and handed[0][0] <= last:
            handed.popleft()  # sent already (read from the outbox)
        batch: list[Written] = []
        while handed and handed[0][0] == last + 1 and len(batch) < self.settings.relay_batch:
            batch.append(handed.popleft())
            last += 1
        return batch

    async def _send(self, batch: list[Written]) -> None:
        try:
            await self.pubsub.ask(RelayEvents(tuple((k, b) for _i, k, b in batch)), timeout=10)
        except (RedisUnavailable, ActorError, TimeoutError) as exc:
            raise NotSent(str(exc) or type(exc).__name__) from exc
        last = batch[-1][0]
        st = self.relay_stats
        st.last_id = last
        st.newest_id = max(st.newest_id, last)
        st.relayed += len(batch)
        now = time.monotonic()
        while self._heard and self._heard[0][0] <= last:
            st.lags.append((now - self._heard.popleft()[1]) * 1000)

    async def _record(self) -> None:
        conn = self.lead.conn
        assert conn is not None
        last = self.relay_stats.last_id
        await conn.execute(
            "UPDATE event_relay SET last_id = $1 WHERE name = 'redis' AND last_id < $1", last
        )
        self._recorded_at = time.monotonic()

    async def _prune(self) -> None:
        """Events past their retention, relayed ones only, in batches."""
        if time.monotonic() - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = time.monotonic()
        conn = self.lead.conn
        assert conn is not None
        while not self.halting():
            deleted = await prune_batch(conn, self.relay_stats.last_id, self.settings.retention)
            self.relay_stats.pruned += deleted
            if deleted < PRUNE_BATCH:
                return
            await asyncio.sleep(0)  # a batch at a time: others get their turn

    async def on_stop(self) -> None:
        conn = self.lead.conn
        if self.lead.leader and conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):  # else the next leader sends a batch again
                await conn.execute(
                    "UPDATE event_relay SET last_id = $1 WHERE name = 'redis' AND last_id < $1",
                    self.relay_stats.last_id,
                    timeout=2,
                )
        self._listening = None
        await self.lead.drop()

    # -- health ------------------------------------------------------------------------------
    async def check(self) -> Health | None:
        st = self.relay_stats
        if not self.settings.relay:
            return Health(status="pass", detail="off (events.relay = false)")
        role = "leader" if self.lead.leader else "standby"
        detail = f"{role}, relayed up to {st.last_id}"
        if self.lead.leader and st.newest_id > st.last_id:
            detail += f", {st.newest_id - st.last_id} waiting"
        if st.last_error:
            return Health(status="warn", detail=f"{detail}; {st.last_error}")
        return Health(status="pass", detail=detail)

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        st = self.relay_stats
        data["relay"] = {
            "leader": self.lead.leader,
            "relayed": st.relayed,
            "lastId": st.last_id,
            "newestId": st.newest_id,
            "pruned": st.pruned,
            "failures": st.failures,
            "lagMsP50": st.lag(0.50),
            "lagMsP99": st.lag(0.99),
        }
        return data


async def prune_batch(conn: asyncpg.Connection, relayed: int, retention: float) -> int:
    """Delete up to PRUNE_BATCH events older than ``retention`` seconds and
    relayed (id <= ``relayed``), oldest first, in one short transaction; how
    many went. The watermark moves first: a reader told "no gap" never
    misses a pruned event."""
    # The oldest batch, along the primary key; of those, the newest past the
    # retention (created_at follows the id to within a transaction's length).
    top = await conn.fetchval(
        "SELECT max(id) FROM (SELECT id, created_at FROM events WHERE id <= $1 "
        "ORDER BY id LIMIT $3) oldest WHERE created_at < now() - make_interval(secs => $2)",
        relayed,
        float(retention),
        PRUNE_BATCH,
    )
    if top is None:
        return 0
    async with conn.transaction():
        await conn.execute(
            "UPDATE event_relay SET last_id = greatest(last_id, $1) WHERE name = 'pruned'", top
        )
        status = await conn.execute("DELETE FROM events WHERE id <= $1", top)
    return int(status.split()[-1])
