"""The pool as the persistence rooms use it: outages become Unavailable.

An outage ("the database is not there or not writable now") is told apart
from "this request is wrong": the first answers 503, the second is the
request's own error.
"""

from __future__ import annotations

import contextlib
from typing import Any

import asyncpg

__all__ = ["OUTAGES", "GuardedPool", "Unavailable", "reset_connection"]


class Unavailable(Exception):
    """The database cannot be reached right now (HTTP maps this to 503)."""


# Errors that say "the database is not there or not writable now", not "this
# request is wrong": a connection lost or refused, the server shutting down,
# out of connections, disk or memory, or a read-only server (a failover).
OUTAGES: tuple[type[BaseException], ...] = (
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
        except OUTAGES as exc:
            raise Unavailable(f"database unreachable: {type(exc).__name__}: {exc}") from exc

    async def __aexit__(self, et: Any, exc: Any, tb: Any) -> None:
        if self._wants_primary and isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
            # The server refuses writes (a standby after a failover): this
            # connection goes, so that a new one finds the primary
            # (target_session_attrs). The others go as they meet it, or all at
            # once when the health check finds a standby. (A server read-only
            # on purpose, with no primary asked for, keeps its connections.)
            self._conn.terminate()
        with contextlib.suppress(*OUTAGES):  # the connection is gone; the pool drops it
            await self._cm.__aexit__(et, exc, tb)
        if isinstance(exc, OUTAGES) and not isinstance(exc, PermissionError):
            raise Unavailable(f"database unavailable: {type(exc).__name__}: {exc}") from exc


async def reset_connection(conn: asyncpg.Connection) -> None:
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
