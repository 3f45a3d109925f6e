"""The persistence actor: owns the asyncpg pool and the migrations (DESIGN §3, §4).

Its messages and their handlers live in rooms beside this module (users,
tokens, agents, commands, approvals); this one owns the connection.

Starting never waits for the database: an outage at boot must degrade health,
not become a restart loop. ``run()`` connects (and migrates, if configured)
with capped backoff until it succeeds; until then asks raise Unavailable and
``/health/ready`` says why. Once connected, the first start of an instance
makes the first admin and writes its token to ``admin_token_file``, and only
then is the actor ready (health passes). Once the pool exists asyncpg
replaces broken connections by itself, so a restarted PostgreSQL needs no
daemon restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg

from actors import migrate as migrations
from actors.data import repo
from actors.kernel import Actor, ActorError, Health, Ref
from actors.outbox import Wake, record
from actors.persistence.agents import agents
from actors.persistence.approvals import approvals
from actors.persistence.base import Durations, PgMessage, Writing
from actors.persistence.commands import commands
from actors.persistence.events import events
from actors.persistence.pool import OUTAGES, GuardedPool, Unavailable, reset_connection
from actors.persistence.tokens import tokens
from actors.persistence.users import EnsureAdmin, ensure_admin, users
from config import ApprovalSettings, PostgresSettings

__all__ = ["Persistence", "PersistenceRef"]

R = TypeVar("R")


class Persistence(Actor):
    rooms = (users, tokens, agents, commands, approvals, events)

    def __init__(
        self,
        settings: PostgresSettings,
        dsn: str,
        *,
        name: str = "persistence",
        health_interval: float = 2.0,
        migration_set: list[migrations.Migration] | None = None,
        approvals: ApprovalSettings | None = None,
        relay: Actor | None = None,
        admin_token_file: Path | None = None,
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
        self.migration_set = migration_set
        self.approvals = approvals or ApprovalSettings()
        self.decision_seconds: dict[str, Durations] = {}
        # Told after a commit that wrote events (the relay); None: nobody.
        self.relay = relay
        # Where the first admin's token goes (None: no admin is made here).
        self.admin_token_file = admin_token_file
        self.server = ""  # host:port of the server the last check reached
        self.last_error = ""
        self.migrated: list[str] = []
        self._pg: asyncpg.Pool | None = None
        # One event for the actor's whole life: waiters from before a restart
        # are released by the restart's connection, not left on a stale event.
        self._ready = asyncio.Event()

    # -- what the rooms use ------------------------------------------------------------------
    def pool(self) -> GuardedPool:
        if self._pg is None:
            raise Unavailable(f"database not connected: {self.last_error or 'connecting'}")
        return GuardedPool(self._pg, wants_primary=self._wants_primary)

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[Writing]:
        """A transaction; the events announced in it go into the outbox
        before it commits (nothing of it, events included, if it fails)."""
        async with self.pool().acquire() as conn:
            w = Writing(conn)
            async with conn.transaction():
                yield w
                written = await record(conn, w.events)
        if written and self.relay is not None:
            # Handed over as committed: the relay sends them without reading
            # them back when they follow what it sent last.
            with contextlib.suppress(ActorError):  # else it reads them soon
                self.relay.tell_nowait(Wake(tuple(written), time.monotonic()))

    # -- connecting ------------------------------------------------------------------------------
    async def on_start(self) -> None:
        self.last_error = ""

    async def run(self) -> None:
        delay = 0.2
        while not self._ready.is_set() and not self._halting:
            try:
                if self._pg is None:
                    await self._connect()
                await self._bootstrap_admin()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.log.warning(
                    "postgres_connect_failed", error=self.last_error, retry_in=round(delay, 2)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._ready.set()
        if not self._ready.is_set():
            return
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
            reset=reset_connection,
        )
        try:
            if s.migrate_on_start:
                async with pool.acquire() as conn:
                    self.migrated = await migrations.migrate(conn, self.migration_set)
        except BaseException:
            await pool.close()
            raise
        self._pg = pool

    async def _bootstrap_admin(self) -> None:
        """First start with no admin: create one and leave its token in a 0600
        file (the only place it is ever written). Several daemons may start
        on one database at once: one of them makes it."""
        path = self.admin_token_file
        if path is None:
            return
        created = await ensure_admin(self, EnsureAdmin())
        if created is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (created.token + "\n").encode())
        finally:
            os.close(fd)
        self.log.warning(
            "admin_created",
            user="admin",
            token_file=str(path),
            hint="use it as 'Authorization: Bearer <token>'; create named admins and revoke it",
        )

    async def wait_ready(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    @property
    def _wants_primary(self) -> bool:
        default = os.environ.get("PGTARGETSESSIONATTRS", "")
        attrs = parse_qs(urlsplit(self.dsn).query).get("target_session_attrs", [default])[0]
        return attrs in ("read-write", "primary")

    # -- health ------------------------------------------------------------------------------------
    async def _ping(self) -> float:
        """A round trip; which server answers (with several hosts in the DSN,
        the one in use now), and whether it still takes writes."""
        started = time.perf_counter()
        pool = self._pg
        if pool is None:
            raise Unavailable(f"database not connected: {self.last_error or 'connecting'}")
        try:
            async with pool.acquire(timeout=self.settings.connect_timeout) as conn:
                addr, port, standby = await conn.fetchrow(
                    "SELECT inet_server_addr()::text, inet_server_port(), pg_is_in_recovery()"
                )
        except (asyncpg.PostgresError, *OUTAGES) as exc:
            raise Unavailable(f"database unreachable: {type(exc).__name__}: {exc}") from exc
        host = None if addr is None else addr.split("/")[0]
        self.server = (
            "local socket"
            if host is None
            else f"[{host}]:{port}"
            if ":" in host
            else f"{host}:{port}"
        )
        if standby and self._wants_primary:
            await pool.expire_connections()
            raise Unavailable(f"{self.server} is a standby now; looking for the primary")
        return (time.perf_counter() - started) * 1000

    async def check(self) -> Health | None:
        if self._pg is None:
            return Health(status="fail", detail=f"not connected: {self.last_error or 'connecting'}")
        try:
            ms = await self._ping()
        except Unavailable as exc:
            return Health(status="fail", detail=str(exc))
        if not self._ready.is_set():
            # Connected, but the first admin is not made yet: not ready.
            return Health(status="fail", detail=f"starting: {self.last_error or 'bootstrapping'}")
        return Health(status="pass", detail=f"ok: {self.server}", observed_ms=round(ms, 3))

    async def on_stop(self) -> None:
        pool, self._pg = self._pg, None
        self._ready.clear()
        if pool is not None:
            try:
                async with asyncio.timeout(max(self.stop_hook_timeout - 2, 1)):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        pool = self._pg
        data["server"] = self.server or None
        data["approvalDecisions"] = {k: v.doc() for k, v in self.decision_seconds.items()}
        data["pool"] = (
            None
            if pool is None
            else {"size": pool.get_size(), "idle": pool.get_idle_size(), "max": pool.get_max_size()}
        )
        return data


class PersistenceRef(Ref):
    """The persistence actor: users, tokens, agents, commands, approvals."""

    async def ask(self, msg: PgMessage[R], timeout: float | None = None) -> R:
        return await self._ask(msg, timeout)
