"""The persistence actor: owns the asyncpg pool and the migrations (DESIGN §3, §4).

Starting never waits for the database: an outage at boot must degrade health,
not become a restart loop. ``run()`` connects (and migrates, if configured)
with capped backoff until it succeeds; until then asks raise Unavailable and
``/health/ready`` says why. Once the pool exists asyncpg replaces broken
connections by itself, so a restarted PostgreSQL needs no daemon restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import msgspec

from actors import migrate as migrations
from actors.data import repo
from actors.data.handlers import DataHandlers
from actors.data.workflow import WorkflowHandlers
from actors.envelope import Event, EventKind
from actors.kernel import Actor, ActorError, Health, handles
from config import ApprovalSettings, PostgresSettings

__all__ = ["Migrate", "MigrationStatus", "Persistence", "PgPing", "Unavailable"]


class Unavailable(Exception):
    """The database cannot be reached right now (HTTP maps this to 503)."""


# Errors that say "the database is not there or not writable now", not "this
# request is wrong": a connection lost or refused, the server shutting down,
# out of connections, disk or memory, or a read-only server (a failover).
_OUTAGES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


class _Guarded:
    """``pool.acquire()`` whose outage errors become Unavailable: any error
    while getting a connection (the server refuses them), and outage errors
    while using one."""

    def __init__(self, pool: asyncpg.Pool, *, wants_primary: bool = False) -> None:
        self._pool = pool
        self._wants_primary = wants_primary
        self._cm: Any = None
        self._conn: Any = None

    async def __aenter__(self) -> asyncpg.Connection:
        self._cm = self._pool.acquire()
        try:
            self._conn = await self._cm.__aenter__()
            return self._conn
        except asyncpg.PostgresError as exc:
            raise Unavailable(f"database refused a connection: {exc}") from exc
        except _OUTAGES as exc:
            raise Unavailable(f"database unreachable: {type(exc).__name__}: {exc}") from exc

    async def __aexit__(self, et: Any, exc: Any, tb: Any) -> None:
        if self._wants_primary and isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
            # The server refuses writes (a standby after a failover): this
            # connection goes, so that a new one finds the primary
            # (target_session_attrs). The others go as they meet it, or all at
            # once when the health check finds a standby. (A server read-only
            # on purpose, with no primary asked for, keeps its connections.)
            self._conn.terminate()
        with contextlib.suppress(*_OUTAGES):  # the connection is gone; the pool drops it
            await self._cm.__aexit__(et, exc, tb)
        if isinstance(exc, _OUTAGES) and not isinstance(exc, PermissionError):
            raise Unavailable(f"database unavailable: {type(exc).__name__}: {exc}") from exc


async def _reset(conn: asyncpg.Connection) -> None:
    """What a connection needs before it goes back to the pool. asyncpg's
    default (UNLISTEN, RESET ALL, advisory unlock, CLOSE ALL) costs a round
    trip on every release; jarvisd sets no session state (its session-level
    advisory locks are released where they are taken), so only a transaction
    left open needs undoing."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class GuardedPool:
    def __init__(self, pool: asyncpg.Pool, *, wants_primary: bool = False) -> None:
        self.pool = pool
        self.wants_primary = wants_primary

    def acquire(self) -> _Guarded:
        return _Guarded(self.pool, wants_primary=self.wants_primary)


class PgPing(msgspec.Struct, frozen=True):
    """Round trip to PostgreSQL; replies with the latency in ms."""


class Migrate(msgspec.Struct, frozen=True):
    """Apply pending migrations; replies with the names applied."""


class MigrationStatus(msgspec.Struct, frozen=True):
    """Replies {"applied": [...], "pending": [...]}."""


class Persistence(DataHandlers, WorkflowHandlers, Actor):
    def __init__(
        self,
        settings: PostgresSettings,
        dsn: str,
        *,
        name: str = "persistence",
        health_interval: float = 2.0,
        migration_set: list[migrations.Migration] | None = None,
        approvals: ApprovalSettings | None = None,
        events: Actor | None = None,
    ) -> None:
        # Several workers so one slow query never holds up the others; the pool bounds real concurrency.
        super().__init__(
            name,
            mailbox_size=1000,
            concurrency=max(settings.pool_max, 1),
            health_interval=health_interval,
        )
        self.settings = settings
        self.dsn = dsn
        self.pool: asyncpg.Pool | None = None
        self.migration_set = migration_set
        self.approvals = approvals or ApprovalSettings()
        # Where committed changes are announced (the pubsub actor); None: nowhere.
        self.events = events
        self.events_dropped = 0
        self.server = ""  # host:port of the server the last check reached
        self.last_error = ""
        self.migrated: list[str] = []
        self._ready = asyncio.Event()

    async def on_start(self) -> None:
        # One event for the actor's whole life: waiters from before a restart
        # are released by the restart's connection, not left on a stale event.
        self.last_error = ""

    async def run(self) -> None:
        delay = 0.2
        while self.pool is None and not self._halting:
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.log.warning(
                    "postgres_connect_failed", error=self.last_error, retry_in=round(delay, 2)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if self.pool is None:
            return
        self._ready.set()
        self.last_error = ""
        # Report the new state now rather than at the next health interval.
        await self.refresh_health()
        self.log.info("postgres_ready", pool_max=self.settings.pool_max, migrated=self.migrated)

    async def _connect(self) -> None:
        s = self.settings
        pool = await asyncpg.create_pool(
            self.dsn,
            min_size=s.pool_min,
            max_size=s.pool_max,
            timeout=s.connect_timeout,
            command_timeout=s.command_timeout,
            # Connections idle this long are closed, so a restarted server's
            # stale sockets are not handed out to queries.
            max_inactive_connection_lifetime=60.0,
            init=repo.init_connection,
            reset=_reset,
        )
        try:
            if s.migrate_on_start:
                async with pool.acquire() as conn:
                    self.migrated = await migrations.migrate(conn, self.migration_set)
        except BaseException:
            await pool.close()
            raise
        self.pool = pool

    def announce(self, published: list[tuple[EventKind, Event]]) -> None:
        """Hand events to the sink without waiting; count the ones it cannot take."""
        if self.events is None or not published:
            return
        from actors.pubsub import PublishEvents

        try:
            self.events.tell_nowait(PublishEvents(tuple(published)))
        except ActorError:  # full, stopped or restarting: the events are dropped
            self.events_dropped += len(published)

    async def wait_ready(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    def _pool(self) -> GuardedPool:
        if self.pool is None:
            raise Unavailable(f"database not connected: {self.last_error or 'connecting'}")
        return GuardedPool(self.pool, wants_primary=self._wants_primary)

    @handles(PgPing)
    async def _ping(self, _msg: PgPing) -> float:
        started = time.perf_counter()
        if self.pool is None:
            raise Unavailable(f"database not connected: {self.last_error or 'connecting'}")
        try:
            async with self.pool.acquire(timeout=self.settings.connect_timeout) as conn:
                addr, port, standby = await conn.fetchrow(
                    "SELECT inet_server_addr()::text, inet_server_port(), pg_is_in_recovery()"
                )
        except (asyncpg.PostgresError, *_OUTAGES) as exc:
            raise Unavailable(f"database unreachable: {type(exc).__name__}: {exc}") from exc
        # Which server answers: with several hosts in the DSN, the one in use now.
        host = None if addr is None else addr.split("/")[0]
        self.server = (
            "local socket"
            if host is None
            else f"[{host}]:{port}"
            if ":" in host
            else f"{host}:{port}"
        )
        if standby and self._wants_primary:
            await self.pool.expire_connections()
            raise Unavailable(f"{self.server} is a standby now; looking for the primary")
        return (time.perf_counter() - started) * 1000

    @property
    def _wants_primary(self) -> bool:
        default = os.environ.get("PGTARGETSESSIONATTRS", "")
        attrs = parse_qs(urlsplit(self.dsn).query).get("target_session_attrs", [default])[0]
        return attrs in ("read-write", "primary")

    @handles(Migrate)
    async def _migrate(self, _msg: Migrate) -> list[str]:
        async with self._pool().acquire() as conn:
            return await migrations.migrate(conn, self.migration_set)

    @handles(MigrationStatus)
    async def _status(self, _msg: MigrationStatus) -> dict[str, list[str]]:
        async with self._pool().acquire() as conn:
            return await migrations.status(conn, self.migration_set)

    async def check(self) -> Health | None:
        if self.pool is None:
            return Health(status="fail", detail=f"not connected: {self.last_error or 'connecting'}")
        try:
            ms = await self._ping(PgPing())
        except Unavailable as exc:
            return Health(status="fail", detail=str(exc))
        return Health(status="pass", detail=f"ok: {self.server}", observed_ms=round(ms, 3))

    async def on_stop(self) -> None:
        pool, self.pool = self.pool, None
        self._ready.clear()
        if pool is not None:
            try:
                async with asyncio.timeout(max(self.stop_hook_timeout - 2, 1)):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        pool = self.pool
        data["eventsDropped"] = self.events_dropped
        data["server"] = self.server or None
        data["pool"] = (
            None
            if pool is None
            else {"size": pool.get_size(), "idle": pool.get_idle_size(), "max": pool.get_max_size()}
        )
        return data
