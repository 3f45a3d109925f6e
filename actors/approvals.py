"""The approvals actor: who sweeps, and the waiters of decisions (DESIGN §3, §6).

- Sweeper: one daemon at a time leads, by a PostgreSQL session advisory lock
  held on a connection of this actor's own. Leadership belongs to that
  connection: a new connection (after a drop, even an idle one) leads only
  once it has taken the lock itself, and the lock is proved on the
  connection before every sweep; when the leading daemon dies its
  connection goes, and the next one to try takes the lock. The leader asks
  the persistence actor to sweep every ``approvals.sweep_interval``
  (``SweepApprovals``): the warnings, the expiries and their events are the
  persistence actor's to write, as every other change is.
- Waiters: ``Watch(approval_id)`` answers a future that completes when a
  decision on that request is announced on ``{prefix}approvals`` (by any
  daemon), or told by this daemon's API as it answers it (``Decided``), so that thousands of long-polls cost no database polling. The
  future also completes when announcements may have been missed (pub/sub
  down or back, the actor stopping): the waiter then reads the request again.
  While pub/sub is down, futures complete after a second (polling instead).
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from actors.kernel import Actor, Health, Message, Ref, handles
from actors.leadership import CONNECTION_LOST, Leadership, lock_key
from actors.persistence import Durations, PendingAges, PersistenceRef, SweepApprovals, Unavailable
from actors.pubsub import Delivery, PubSubRef, Subscription
from config import ApprovalSettings, PostgresSettings

__all__ = ["Approvals", "ApprovalsRef", "Decided", "Watch", "WatchersFull"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)  # a message of a reply type is one of any wider type
# pg_try_advisory_lock key of the sweeper.
SWEEPER_LOCK = lock_key("jarvisd.approvals-sweeper")
SWEEP_BATCH = 500
POLL_WHEN_BLIND = 1.0


class WatchersFull(Exception):
    """approvals.max_waiters callers are waiting already (HTTP 503)."""


class ApprovalsMessage(Message[R_co], frozen=True):
    """A message the approvals actor answers with ``R``."""


class Watch(ApprovalsMessage[asyncio.Future[None]], frozen=True):
    """Replies a future completed when ``approval_id`` may have been decided
    (read it again to know)."""

    approval_id: int


class Decided(ApprovalsMessage[None], frozen=True):
    """``approval_id`` was decided by this daemon: its waiters here read it
    again now, before the announcement comes back from Redis."""

    approval_id: int


class _Decided(msgspec.Struct, rename="camel"):
    type: str = ""
    data: dict[str, Any] = {}


_decided = msgspec.json.Decoder(_Decided)


@dataclass
class SweepStats:
    sweeps: int = 0
    warned: int = 0
    expired: int = 0
    escalated: int = 0
    last_error: str = ""
    # How old the pending requests are (every daemon reads it, leader or not).
    pending_ages: Durations | None = None


class Approvals(Actor):
    def __init__(
        self,
        settings: ApprovalSettings,
        postgres: PostgresSettings,
        dsn: str,
        *,
        persistence: PersistenceRef,
        pubsub: PubSubRef,
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
        self.lead = Leadership(dsn, postgres, SWEEPER_LOCK, self._lead)
        self._waiters: dict[int, set[asyncio.Future[None]]] = {}
        self._waiting = 0  # futures in _waiters
        self._watching = False  # subscribed to the announcements
        self.decisions = Subscription(
            pubsub,
            f"{name}:decisions",
            sink=self._on_delivery,
            channels=lambda: (self.channel,),
            on_up=self._heard,
            on_down=self._deafened,
        )

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

    @handles(Decided)
    async def _decided_here(self, msg: Decided) -> None:
        for fut in list(self._waiters.get(msg.approval_id, ())):
            _wake(fut)

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

    def _heard(self) -> None:
        self._watching = True
        self._wake_all()  # whatever was announced before now: read again

    def _deafened(self) -> None:
        self._watching = False
        self._wake_all()

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
        self.spawn(self.decisions.keep(), "decisions")
        await self._sweep_loop()

    async def _sweep_loop(self) -> None:
        while not self.halting():
            try:
                if await self.lead.leading():
                    await self._sweep()
                    await self._read_ages()
                else:
                    self.sweep_stats.pending_ages = None  # the leader tells them
            except CONNECTION_LOST as exc:
                self.sweep_stats.last_error = f"{type(exc).__name__}: {exc}"
                self.log.warning("sweep_failed", error=self.sweep_stats.last_error)
                await self.lead.drop()
            except Unavailable as exc:  # the database is not there (yet): next turn
                self.log.debug("sweep_waiting", error=str(exc))
            except Exception as exc:  # the persistence actor's answer: try again next turn
                self.sweep_stats.last_error = f"{type(exc).__name__}: {exc}"
                self.log.warning("sweep_failed", error=self.sweep_stats.last_error)
            await asyncio.sleep(self.settings.sweep_interval)

    async def _read_ages(self) -> None:
        """How old the pending requests are, for /metrics: read by the leader
        alone (the figures are the database's, the same from every daemon),
        and dropped when they cannot be read rather than left stale."""
        try:
            self.sweep_stats.pending_ages = await self.persistence.ask(PendingAges(), timeout=30)
        except Exception as exc:
            self.sweep_stats.pending_ages = None
            self.log.debug("pending_ages_unread", error=f"{type(exc).__name__}: {exc}")

    def _lead(self, leading: bool) -> None:
        self.log.info("sweeper_leading" if leading else "sweeper_standing_by")

    async def _sweep(self) -> None:
        swept = await self.persistence.ask(
            SweepApprovals(
                warn_before=self.settings.warn_before,
                limit=SWEEP_BATCH,
                escalate_after=self.settings.escalate_after,
            ),
            timeout=60,
        )
        self.sweep_stats.sweeps += 1
        self.sweep_stats.warned += swept.warned
        self.sweep_stats.expired += swept.expired
        self.sweep_stats.escalated += swept.escalated
        if swept.escalated:
            self.log.info("approvals_escalated", count=swept.escalated)
        if swept.expired:
            self.log.info("approvals_expired", count=swept.expired)

    async def on_stop(self) -> None:
        self._wake_all()  # waiters read the request again and answer
        await self.lead.drop()

    # -- health ---------------------------------------------------------------------------------
    async def check(self) -> Health | None:
        st = self.sweep_stats
        role = "sweeper" if self.lead.leader else "standby"
        detail = f"{role}, {self._waiting} waiting, {st.expired} expired"
        if st.last_error and self.lead.conn is None:
            return Health(status="warn", detail=f"{detail}; {st.last_error}")
        return Health(status="pass", detail=detail)

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        st = self.sweep_stats
        data["approvals"] = {
            "sweeper": self.lead.leader,
            "sweeps": st.sweeps,
            "warned": st.warned,
            "expired": st.expired,
            "escalated": st.escalated,
            "pendingAges": None if st.pending_ages is None else st.pending_ages.doc(),
            "waiting": self._waiting,
            "watching": self._watching,
        }
        return data


class ApprovalsRef(Ref):
    """The approvals actor: the waiters of decisions."""

    async def ask(self, msg: ApprovalsMessage[R], timeout: float | None = None) -> R:
        return await self._ask(msg, timeout)

    def tell_nowait(self, msg: ApprovalsMessage[None]) -> None:
        self._tell_nowait(msg)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
