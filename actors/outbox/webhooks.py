"""Webhooks: every matching event from the outbox to each ``[[webhooks]]``
endpoint, signed, in id order, at least once, by one daemon at a time.

The leader (a session advisory lock on a connection of its own, as the
relay leads) runs one task per endpoint, each with its own HTTP client: a
slow or dead endpoint holds up only itself. An endpoint's place (the last
event done) is kept in ``webhook_endpoints`` and moves only once the
endpoint answered 2xx (or the event is not one it takes). A failure is
retried with doubling, jittered pauses; after ``max_attempts`` failures at
one event the endpoint is marked dead and holds its place until
``RetryWebhook`` (``jarvisd webhooks retry``), from any daemon: nothing is
skipped. Events pruned (``events.retention``) before an endpoint got them
are a gap, counted and logged."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg

from actors.data.repo import NotFound
from actors.kernel import Actor, Health, handles
from actors.leadership import CONNECTION_LOST, Leadership, lock_key
from actors.outbox.endpoints import Endpoint
from actors.outbox.hooks import clean, payload, post
from actors.outbox.store import NOTIFY_CHANNEL, wire
from actors.outbox.webhook_messages import ListWebhooks, RetryWebhook, WebhookInfo
from actors.persistence.pool import Unavailable
from config import EventSettings, PostgresSettings, WebhookSettings

if TYPE_CHECKING:  # aiohttp's client is loaded by the first delivery (the CLI needs none)
    import aiohttp

__all__ = ["RETRY_CHANNEL", "WEBHOOK_LOCK", "Webhooks"]

WEBHOOK_LOCK = lock_key("jarvisd.webhooks")
RETRY_CHANNEL = "jarvisd_webhooks"  # a retry, from any daemon: the payload is the name
BATCH = 100  # events read at a time per endpoint
_RETRY = 0.5  # seconds before trying again after a database failure


class NotLeading(Exception):
    """This daemon does not hold the lock now: an endpoint's task waits."""


class Webhooks(Actor):
    def __init__(
        self,
        hooks: tuple[WebhookSettings, ...],
        events: EventSettings,
        postgres: PostgresSettings,
        dsn: str,
        *,
        link_base: str,
        name: str = "webhooks",
        health_interval: float = 2.0,
    ) -> None:
        super().__init__(name, mailbox_size=100, health_interval=health_interval)
        self.events = events
        self.link_base = link_base
        self.lead = Leadership(dsn, postgres, WEBHOOK_LOCK, self._lead)
        self.endpoints: dict[str, Endpoint] = {}
        self._changed = asyncio.Event()
        self._db = asyncio.Lock()  # one query at a time on the lock's connection
        self._listening: asyncpg.Connection | None = None
        self.configure(hooks)

    def configure(self, hooks: tuple[WebhookSettings, ...]) -> None:
        """Take the endpoints as configured now (start, or a reload)."""
        kept: dict[str, Endpoint] = {}
        for hook in hooks:
            old = self.endpoints.get(hook.name)
            if old is not None and old.hook == hook:
                kept[hook.name] = old
            else:
                if old is not None and old.task is not None:
                    old.task.cancel()
                kept[hook.name] = Endpoint(hook)
        for name, old in self.endpoints.items():
            if name not in kept and old.task is not None:
                old.task.cancel()
        self.endpoints = kept
        self._changed.set()

    def _lead(self, leading: bool) -> None:
        self.log.info("webhooks_leading" if leading else "webhooks_standing_by")

    def _notified(self, _conn: Any, _pid: int, channel: str, payload_: str) -> None:
        for name, ep in self.endpoints.items():
            if channel == NOTIFY_CHANNEL:
                ep.wake.set()
            elif payload_ == name:  # a retry, from any daemon
                ep.wake.set()
                ep.retry_now.set()

    # -- the loop: lead, then one task per endpoint ------------------------------------------
    async def run(self) -> None:
        while not self.halting():
            self._changed.clear()
            try:
                if self.endpoints:
                    if await self._leading():
                        await self._start_endpoints()
                    else:
                        self._stop_endpoints()
                    await self._refresh()
                elif self.lead.conn is not None:
                    await self.lead.drop()  # nothing to deliver: another daemon may
                    self._listening = None
            except asyncpg.UndefinedTableError:  # the migration is not applied yet
                await asyncio.sleep(_RETRY)
                continue
            except (*CONNECTION_LOST, Unavailable) as exc:
                self.log.warning("webhooks_database_lost", error=f"{type(exc).__name__}: {exc}")
                self._stop_endpoints()
                self._listening = None
                await self.lead.drop()
                await asyncio.sleep(_RETRY)
                continue
            wait = self.events.poll_interval if self.endpoints else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)

    async def _leading(self) -> bool:
        async with self._db:
            if not await self.lead.leading():
                return False
            conn = self.lead.conn
            assert conn is not None
            if self._listening is not conn:
                await conn.add_listener(NOTIFY_CHANNEL, self._notified)
                await conn.add_listener(RETRY_CHANNEL, self._notified)
                self._listening = conn
            return True

    async def _start_endpoints(self) -> None:
        async with self._db:
            conn = self.lead.conn
            assert conn is not None
            # A new endpoint starts with the events committed after it is first seen.
            await conn.execute(
                "INSERT INTO webhook_endpoints (name, last_id) "
                "SELECT n, (SELECT coalesce(max(id), 0) FROM events) FROM unnest($1::text[]) n "
                "ON CONFLICT (name) DO NOTHING",
                list(self.endpoints),
            )
        for ep in self.endpoints.values():
            if ep.task is None or ep.task.done():
                ep.task = self.spawn(self._serve(ep), f"webhook.{ep.hook.name}")

    def _stop_endpoints(self) -> None:
        for ep in self.endpoints.values():
            if ep.task is not None:
                ep.task.cancel()
                ep.task = None

    async def _refresh(self) -> None:
        """Every endpoint's row as it is now (a standby shows the leader's progress)."""
        for row in await self._fetch(
            "SELECT * FROM webhook_endpoints WHERE name = ANY($1::text[])", list(self.endpoints)
        ):
            ep = self.endpoints.get(row["name"])
            if ep is not None:
                ep.row = dict(row)

    @contextlib.asynccontextmanager
    async def _conn(self, *, leading: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """The lock's connection, one user at a time. ``leading``: only while
        it holds the lock (an endpoint's task: none after the lock's
        connection went, whoever leads now); else a connection of the moment
        when there is none (an admin's call on a standby)."""
        async with self._db:
            conn = self.lead.conn
            if conn is not None and not conn.is_closed() and (self.lead.leader or not leading):
                yield conn
                return
        if leading:
            self._changed.set()  # the loop proves the lock again at once
            raise NotLeading("the lock's connection is gone")
        try:
            conn = await asyncpg.connect(self.lead.dsn, timeout=self.lead.postgres.connect_timeout)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise Unavailable(f"database unreachable: {type(exc).__name__}: {exc}") from exc
        try:
            yield conn
        finally:
            await conn.close()

    async def _fetch(self, query: str, *args: Any, leading: bool = False) -> list[asyncpg.Record]:
        async with self._conn(leading=leading) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows

    # -- one endpoint --------------------------------------------------------------------------
    async def _serve(self, ep: Endpoint) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=ep.hook.timeout)
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            while True:
                ep.wake.clear()  # before looking: an event told meanwhile wakes the wait
                try:
                    busy = await self._serve_batch(ep, http)
                except NotLeading:
                    await asyncio.sleep(_RETRY)  # until the loop leads again, or stops this
                    continue
                except Exception as exc:  # the database, or anything else: never the daemon
                    self.log.warning(
                        "webhook_task_failed", webhook=ep.hook.name, error=clean(repr(exc))
                    )
                    self._changed.set()  # the lock proved again at once
                    await asyncio.sleep(_RETRY)
                    continue
                if not busy:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ep.wake.wait(), self.events.poll_interval)

    async def _serve_batch(self, ep: Endpoint, http: aiohttp.ClientSession) -> bool:
        """Deliver what waits, up to a batch; whether more may wait."""
        rows = await self._fetch(
            "SELECT * FROM webhook_endpoints WHERE name = $1", ep.hook.name, leading=True
        )
        if not rows:  # not there yet (the leader's loop inserts it)
            return False
        ep.row = dict(rows[0])
        if ep.row["dead"]:
            return False
        events = await self._fetch(
            "SELECT id, type, body FROM events WHERE id > $1 ORDER BY id LIMIT $2",
            ep.row["last_id"],
            BATCH,
            leading=True,
        )
        # The watermark after the events: a prune between the two is seen.
        pruned = (
            await self._fetch("SELECT last_id FROM event_relay WHERE name = 'pruned'", leading=True)
        )[0]["last_id"]
        if ep.row["last_id"] < pruned:
            self.log.warning(
                "webhook_gap", webhook=ep.hook.name, after=ep.row["last_id"], resumes_after=pruned
            )
            await self._save(ep, "last_id = greatest(last_id, $2), gaps = gaps + 1", pruned)
            return True
        done = ep.row["last_id"]
        for event in events:
            if ep.match.fullmatch(event["type"]) and not await self._deliver(ep, http, event):
                return False
            done = event["id"]
        if done != ep.row["last_id"]:
            await self._save(ep, "last_id = greatest(last_id, $2)", done)
        return len(events) == BATCH

    async def _deliver(
        self, ep: Endpoint, http: aiohttp.ClientSession, event: asyncpg.Record
    ) -> bool:
        """Until it answers 2xx (True) or is marked dead (False). Attempts
        are counted in the row itself: a retry asked for meanwhile (from any
        daemon) starts the count afresh, and ends the pause."""
        hook = ep.hook
        body = payload(hook, wire(event["id"], event["body"]), hook.link_base or self.link_base)
        while True:
            ep.retry_now.clear()  # a retry from here on ends the pause below
            attempt = ep.row["attempts"] + 1
            status, error = await post(http, hook, event["id"], event["type"], body, attempt)
            if status is not None and 200 <= status < 300:
                await self._save(
                    ep,
                    "last_id = greatest(last_id, $2), delivered = delivered + 1, attempts = 0, "
                    "last_status = $3, last_error = NULL",
                    event["id"],
                    status,
                )
                return True
            await self._save(
                ep,
                "attempts = attempts + 1, failures = failures + 1, "
                "dead = attempts + 1 >= $2, last_status = $3, last_error = $4",
                hook.max_attempts,
                status,
                error,
            )
            if ep.row["dead"]:
                self.log.error(
                    "webhook_dead",
                    webhook=hook.name,
                    event_id=event["id"],
                    attempts=ep.row["attempts"],
                    error=error,
                )
                return False
            pause = min(hook.backoff_max, hook.backoff * 2 ** (ep.row["attempts"] - 1))
            pause *= random.uniform(0.75, 1.0)  # noqa: S311 - jitter: failing endpoints part
            self.log.warning(
                "webhook_failed",
                webhook=hook.name,
                event_id=event["id"],
                attempt=ep.row["attempts"],
                error=error,
                retry_in=round(pause, 3),
            )
            with contextlib.suppress(TimeoutError):  # or a retry asked for now
                await asyncio.wait_for(ep.retry_now.wait(), pause)
            if ep.retry_now.is_set():
                ep.row["attempts"] = 0  # counted afresh, as the retry recorded

    async def _save(self, ep: Endpoint, assignments: str, *args: Any) -> None:
        rows = await self._fetch(
            f"UPDATE webhook_endpoints SET {assignments}, updated_at = now() "
            "WHERE name = $1 RETURNING *",
            ep.hook.name,
            *args,
            leading=True,
        )
        if rows:
            ep.row = dict(rows[0])

    # -- what people ask -----------------------------------------------------------------------
    @handles(ListWebhooks)
    async def _list(self, _msg: ListWebhooks) -> list[WebhookInfo]:
        if self.endpoints:
            await self._refresh()
        return [ep.info() for ep in self.endpoints.values()]

    @handles(RetryWebhook)
    async def _retry(self, msg: RetryWebhook) -> WebhookInfo:
        ep = self.endpoints.get(msg.name)
        if ep is None:
            raise NotFound(f"no webhook {msg.name[:64]!r} is configured")
        rows = await self._fetch(
            "WITH done AS (UPDATE webhook_endpoints SET dead = false, attempts = 0, "
            "updated_at = now() WHERE name = $1 RETURNING *) "
            "SELECT done.*, pg_notify($2, $1) FROM done",
            msg.name,
            RETRY_CHANNEL,
        )
        if rows:
            ep.row = {k: v for k, v in dict(rows[0]).items() if k != "pg_notify"}
        self.log.info("webhook_retried", webhook=msg.name)
        ep.wake.set()
        ep.retry_now.set()
        return ep.info()

    async def on_stop(self) -> None:
        self._stop_endpoints()
        self._listening = None
        await self.lead.drop()

    # -- health --------------------------------------------------------------------------------
    async def check(self) -> Health | None:
        if not self.endpoints:
            return Health(status="pass", detail="no webhooks configured")
        dead = [n for n, ep in self.endpoints.items() if ep.state() == "dead"]
        role = "leader" if self.lead.leader else "standby"
        if dead:
            return Health(
                status="warn",
                detail=f"{role}; dead: {', '.join(dead)} (`jarvisd webhooks retry NAME`)",
            )
        return Health(status="pass", detail=f"{role}, {len(self.endpoints)} endpoints")

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        data["webhooks"] = {
            "leader": self.lead.leader,
            "endpoints": [ep.stats() for ep in self.endpoints.values()],
        }
        return data
