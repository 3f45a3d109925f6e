"""One daemon at a time: leadership by a PostgreSQL session advisory lock
held on a connection of its own (the approvals sweeper, the event relay).

Leadership belongs to that connection: a new connection (after a drop, even
an idle one) leads only once it has taken the lock itself, and the lock is
proved on the connection each time it is asked; when the leading daemon
dies its connection goes, and the next one to try takes the lock."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable

import asyncpg

from actors.data.repo import init_connection
from config import PostgresSettings

__all__ = ["CONNECTION_LOST", "Leadership", "lock_key"]

# Errors of the lock's connection that mean "lost it": whatever it held is gone.
CONNECTION_LOST = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def lock_key(name: str) -> int:
    """A stable 63-bit pg_try_advisory_lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


class Leadership:
    def __init__(
        self,
        dsn: str,
        postgres: PostgresSettings,
        key: int,
        on_change: Callable[[bool], None],
    ) -> None:
        self.dsn = dsn
        self.postgres = postgres
        self.key = key
        self.on_change = on_change
        self.conn: asyncpg.Connection | None = None  # the lock's, while leading or trying
        self.leader = False

    async def leading(self) -> bool:
        """Whether this daemon leads now, proved on the lock's connection."""
        conn = self.conn
        if conn is not None and conn.is_closed():
            await self.drop()
            conn = None
        if conn is None:
            conn = await asyncpg.connect(
                self.dsn,
                timeout=self.postgres.connect_timeout,
                command_timeout=self.postgres.command_timeout,
            )
            await init_connection(conn)
            self.conn = conn
        if self.leader:
            # Still ours? A round trip on the very connection that holds it.
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND objsubid = 1 "
                "AND classid = ($1::bigint >> 32)::oid AND objid = ($1::bigint & 4294967295)::oid",
                self.key,
            )
            if held:
                return True
            self._set(False)
        # Held as long as this connection lives: one leader at a time.
        self._set(bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key)))
        return self.leader

    def _set(self, leading: bool) -> None:
        if leading != self.leader:
            self.leader = leading
            self.on_change(leading)

    async def drop(self) -> None:
        """Close the lock's connection: the lock goes with it."""
        conn, self.conn = self.conn, None
        self._set(False)
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)
