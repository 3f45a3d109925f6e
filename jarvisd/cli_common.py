"""What the CLI's commands share: loading the config, reaching the database."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

from config import LoadedConfig, load_settings

__all__ = ["database_dsn", "load", "with_database"]


def load(args: argparse.Namespace) -> LoadedConfig:
    return load_settings(Path(args.config) if args.config else None)


@contextlib.asynccontextmanager
async def database_dsn(loaded: LoadedConfig) -> AsyncIterator[str]:
    """The configured database's DSN. In embedded mode: the running daemon's
    server if there is one, else the embedded server started for the duration
    of the command (and stopped after it)."""
    from actors.embedded import EmbeddedPostgres, RunAs

    s = loaded.settings
    if not s.embedded_postgres:
        assert s.postgres.dsn is not None
        yield s.postgres.dsn
        return
    pg = EmbeddedPostgres(
        Path(s.daemon.state_dir),
        run_as=RunAs.resolve(s.embedded.postgres_user),
        bin_dir=s.embedded.postgres_bin_dir,
        start_timeout=s.embedded.start_timeout,
    )
    try:
        probe = await asyncpg.connect(pg.dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        probe = None
    if probe is not None:
        await probe.close()
        yield pg.dsn
        return
    await pg.start()
    try:
        yield pg.dsn
    finally:
        await pg.stop()


async def with_database(loaded: LoadedConfig, work: Any) -> Any:
    """Run ``work(conn)`` on one connection to the configured database."""
    async with database_dsn(loaded) as dsn:
        conn = await asyncpg.connect(dsn, timeout=loaded.settings.postgres.connect_timeout)
        try:
            return await work(conn)
        finally:
            await conn.close()
