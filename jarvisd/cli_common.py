"""What the CLI's commands share: loading the config, reaching the database."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from config import LoadedConfig, load_settings

__all__ = [
    "Refused",
    "call_daemon",
    "client_session",
    "daemon_endpoint",
    "database_dsn",
    "load",
    "redis_url",
    "run_call",
    "tell_daemons",
    "token_from",
    "with_database",
]


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


def redis_url(loaded: LoadedConfig) -> str:
    """The configured Redis: the embedded server's socket, or redis.url."""
    from actors.embedded import EmbeddedValkey, RunAs

    s = loaded.settings
    if s.embedded_redis:
        server = EmbeddedValkey(
            Path(s.daemon.state_dir), run_as=RunAs.resolve(s.embedded.postgres_user)
        )
        return server.url
    assert s.redis.url is not None
    return s.redis.url


async def tell_daemons(loaded: LoadedConfig, what: Any) -> None:
    """Tell every daemon on the configured Redis that a caller changed (the
    CLI changed a user or a token), so that none trusts a cached identity,
    and that they read the agents again (a user disabled may be an agent).
    No Redis answering means no daemon runs: nothing to tell."""
    import sys

    from actors.bus import agents_channel
    from actors.redis_link import REDIS_FAILURES, connect_redis
    from jarvisd.principals import encode_invalidation, internal_channel

    s = loaded.settings
    client = connect_redis(redis_url(loaded), s.redis, name="jarvisd-cli", timeout=2)
    try:
        await client.publish(internal_channel(s.redis.prefix), encode_invalidation(what))
        await client.publish(agents_channel(s.redis.prefix), b"changed")
    except REDIS_FAILURES as exc:
        if not s.embedded_redis:
            print(f"jarvisd: could not tell running daemons ({exc})", file=sys.stderr)
    finally:
        await client.aclose()


def daemon_endpoint(
    loaded: LoadedConfig, token: str | None
) -> tuple[str | None, str, dict[str, str]]:
    """(Unix socket or None, base URL, headers) of the running daemon: its
    Unix socket (the local admin, by peer credentials) unless a token is
    given, else its TCP port with the token."""
    http = loaded.settings.http
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if http.unix_socket and Path(http.unix_socket).exists() and not token:
        return http.unix_socket, "http://localhost", headers
    host = "127.0.0.1" if http.host in ("0.0.0.0", "", "::") else http.host  # noqa: S104
    host = f"[{host}]" if ":" in host else host
    return None, f"http://{host}:{http.port}", headers


def client_session(socket_path: str | None, **kwargs: Any) -> aiohttp.ClientSession:
    connector = aiohttp.UnixConnector(path=socket_path) if socket_path else None
    return aiohttp.ClientSession(connector=connector, **kwargs)


def token_from(args: argparse.Namespace) -> str | None:
    """``--token``, else ``$JARVISD_TOKEN``, else None (the Unix socket)."""
    return getattr(args, "token", None) or os.environ.get("JARVISD_TOKEN") or None


class Refused(Exception):
    """The daemon answered with an error status."""


async def call_daemon(
    args: argparse.Namespace, method: str, path: str, body: Any = None, timeout: float = 15
) -> Any:
    """One call to the running daemon's API (its Unix socket as the local
    admin, or its TCP port with ``--token``); the answer's JSON, or Refused."""
    socket_path, base, headers = daemon_endpoint(load(args), token_from(args))
    async with (
        client_session(socket_path, timeout=aiohttp.ClientTimeout(total=timeout)) as s,
        s.request(method, base + path, json=body, headers=headers) as resp,
    ):
        doc = await resp.json(content_type=None) if await resp.read() else None
        if resp.status >= 400:
            detail = doc.get("detail", doc.get("title")) if isinstance(doc, dict) else doc
            raise Refused(f"{resp.status}: {detail}")
        return doc


def run_call(name: str, work: Any) -> int:
    """Run ``work()`` (calls to the daemon); exit 1 with the reason when the
    daemon refuses or cannot be reached."""
    import asyncio
    import sys

    try:
        return int(asyncio.run(work()))
    except Refused as exc:
        print(f"jarvisd {name}: {exc}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(f"jarvisd {name}: daemon unreachable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
