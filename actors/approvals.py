"""The approvals actor: the expiry sweeper and the waiters of decisions
(DESIGN §3, §6).

- Sweeper: one daemon at a time (a PostgreSQL session advisory lock held on
  this actor's own connection; when that daemon dies its connection goes and
  the next one to try takes the lock). Every ``approvals.sweep_interval`` it
  announces ``approval.warning`` for pending requests near their deadline
  (once each) and expires the ones past it: a rejection of the request and of
  its command, with their audit events, announced as ``approval.expired`` and
  ``command.rejected``.
- Waiters: ``Watch(approval_id)`` answers a future that completes when a
  decision on that request is announced on ``{prefix}approvals`` (by any
  daemon), so that thousands of long-polls cost no database polling. The
  future also completes when announcements may have been missed (pub/sub
  down or back, the actor stopping): the waiter then reads the request again.
  While pub/sub is down, futures complete after a second (polling instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from actors.data import events, repo
from actors.data.repo import init_connection
from actors.envelope import Event, EventKind
from actors.kernel import Actor, ActorError, Health, handles
from actors.pubsub import Delivery, Detach, PublishEvents, Subscribe, Subscriber
from config import ApprovalSettings, PostgresSettings

__all__ = ["Approvals", "Watch", "WatchersFull"]

# pg_try_advisory_lock key of the sweeper: a stable 63-bit number.
SWEEPER_LOCK = int.from_bytes(hashlib.sha256(b"jarvisd.approvals-sweeper").digest()[:8], "big") >> 1
SWEEP_BATCH = 500
POLL_WHEN_BLIND = 1.0


class WatchersFull(Exception):
    """approvals.max_waiters callers are waiting already (HTTP 503)."""


class Watch(msgspec.Struct, frozen=True):
    """Replies an asyncio.Future completed when ``approval_id`` may have been
    decided (read it again to know)."""

    approval_id: int


class _Decided(msgspec.Struct, rename="camel"):
    type: str = ""
    data: dict[str, Any] = {}


_decided = msgspec.json.Decoder(_Decided)


@dataclass
class SweepStats:
    leader: bool = False
    sweeps: int = 0
    warned: int = 0
    expired: int = 0
    last_error: str = ""


class Approvals(Actor):
    def __init__(
        self,
        settings: ApprovalSettings,
        postgres: PostgresSettings,
        dsn: str,
        *,
        persistence: Actor,
        pubsub: Actor,
        channel: str,
        name: str = "approvals",
        health_interval: float = 2.0,
    ) -> None:
        super().__init__(name, mailbox_size=10_000, health_interval=health_interval)
        self.settings = settings
        self.postgres = postgres
        self.dsn = dsn
        self.persistence = persistence
        self.pubsub = pubsub
        self.channel = channel
        self.sweep_stats = SweepStats()
        self._conn: asyncpg.Connection | None = None
        self._waiters: dict[int, set[asyncio.Future[None]]] = {}
        self._waiting = 0  # futures in _waiters
        self._watching = False  # subscribed to the announcements

    # -- waiters ---------------------------------------------------------------------------
    @handles(Watch)
    async def _watch(self, msg: Watch) -> asyncio.Future[None]:
        if self._waiting >= self.settings.max_waiters:
            raise WatchersFull(
                f"{self.settings.max_waiters} callers wait for decisions already "
                "(approvals.max_waiters)"
            )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        waiters = self._waiters.setdefault(msg.approval_id, set())
        waiters.add(fut)
        self._waiting += 1
        fut.add_done_callback(functools.partial(self._forget, msg.approval_id))
        if not self._watching:
            loop.call_later(POLL_WHEN_BLIND, _wake, fut)
        return fut

    def _forget(self, approval_id: int, fut: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(approval_id)
        if waiters is not None and fut in waiters:
            waiters.discard(fut)
            self._waiting -= 1
            if not waiters:
                del self._waiters[approval_id]

    def _wake_all(self) -> None:
        for waiters in list(self._waiters.values()):
            for fut in list(waiters):
                _wake(fut)

    def _on_delivery(self, item: Delivery) -> bool:
        if item.kind != "message":
            # down: announcements may be missed; gap: some were. Read again.
            self._watching = item.kind == "gap"
            self._wake_all()
            return True
        try:
            announced = _decided.decode(item.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return True
        if announced.type in ("approval.decided", "approval.expired"):
            approval_id = announced.data.get("approvalId")
            for fut in (
                list(self._waiters.get(approval_id, ())) if isinstance(approval_id, int) else ()
            ):
                _wake(fut)
        return True

    # -- the loops -------------------------------------------------------------------------------
    async def run(self) -> None:
        await asyncio.gather(self._listen(), self._sweep_loop())

    async def _listen(self) -> None:
        while not self.halting():
            lost = asyncio.Event()
            sub = Subscriber(
                f"{self.name}:decisions", sink=self._on_delivery, on_close=_setter(lost)
            )
            try:
                await self.pubsub.ask(Subscribe(sub, channels=(self.channel,)), timeout=10)
            except Exception as exc:  # pub/sub not connected yet
                self.log.debug("approvals_subscribe_retry", error=repr(exc))
                with contextlib.suppress(Exception):
                    await self.pubsub.ask(Detach(sub), timeout=2)
                await asyncio.sleep(0.5)
                continue
            self._watching = True
            self._wake_all()  # whatever was announced before now: read again
            try:
                await lost.wait()
            finally:
                self._watching = False

    async def _sweep_loop(self) -> None:
        while not self.halting():
            try:
                await self._sweep()
            except asyncpg.UndefinedTableError:
                # A new database whose migrations the persistence actor is applying now.
                self.log.debug("sweep_waiting_for_migrations")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                self.sweep_stats.last_error = f"{type(exc).__name__}: {exc}"
                self.sweep_stats.leader = False
                self.log.warning("sweep_failed", error=self.sweep_stats.last_error)
                await self._drop_connection()
            await asyncio.sleep(self.settings.sweep_interval)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self.dsn,
                timeout=self.postgres.connect_timeout,
                command_timeout=self.postgres.command_timeout,
            )
            await init_connection(self._conn)
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    async def _sweep(self) -> None:
        conn = await self._connection()
        if not self.sweep_stats.leader:
            # Held as long as this connection lives: one sweeper at a time.
            self.sweep_stats.leader = bool(
                await conn.fetchval("SELECT pg_try_advisory_lock($1)", SWEEPER_LOCK)
            )
            if self.sweep_stats.leader:
                self.log.info("sweeper_leading")
        if not self.sweep_stats.leader:
            return
        self.sweep_stats.sweeps += 1
        warned = await repo.warn_due(conn, self.settings.warn_before, SWEEP_BATCH)
        expired = await repo.expire_due(conn, SWEEP_BATCH)
        out: list[tuple[EventKind, Event]] = [events.approval_warning(a, r) for a, r in warned]
        for approval in expired:
            command = None
            if approval.command_id is not None:
                with contextlib.suppress(repo.NotFound):
                    command = await repo.get_command(conn, approval.command_id)
            ref = (command.request_id, command.sender) if command is not None else None
            out.append(events.approval_decided(approval, ref, approval.requester_id))
            if command is not None and command.status == "expired":
                out.append(events.command_decided(command))
        self.sweep_stats.warned += len(warned)
        self.sweep_stats.expired += len(expired)
        if out:
            try:
                self.pubsub.tell_nowait(PublishEvents(tuple(out)))
            except ActorError as exc:  # notifications: the state is committed
                self.log.warning("sweep_events_dropped", count=len(out), error=repr(exc))
        if expired:
            self.log.info("approvals_expired", count=len(expired))

    async def on_stop(self) -> None:
        self._wake_all()  # waiters read the request again and answer
        await self._drop_connection()  # the lock goes with it
        self.sweep_stats.leader = False

    # -- health ---------------------------------------------------------------------------------
    async def check(self) -> Health | None:
        st = self.sweep_stats
        role = "sweeper" if st.leader else "standby"
        detail = f"{role}, {self._waiting} waiting, {st.expired} expired"
        if st.last_error and self._conn is None:
            return Health(status="warn", detail=f"{detail}; {st.last_error}")
        return Health(status="pass", detail=detail)

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        st = self.sweep_stats
        data["approvals"] = {
            "sweeper": st.leader,
            "sweeps": st.sweeps,
            "warned": st.warned,
            "expired": st.expired,
            "waiting": self._waiting,
            "watching": self._watching,
        }
        return data


def _setter(event: asyncio.Event) -> Any:
    def on_close(_reason: str) -> None:
        event.set()

    return on_close


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
