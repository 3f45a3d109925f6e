"""The persistence and redis actors against real servers, including outages."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import asyncpg
import pytest

from actors import migrate as migrations
from actors.embedded import EMBEDDED_ACCOUNT, EmbeddedPostgres, RunAs
from actors.persistence import ListAgents, Persistence, Unavailable
from actors.redis_link import RedisInfo, RedisLink, RedisPing, RedisUnavailable
from config import PostgresSettings, RedisSettings
from tests.servers import FAST_PG, Servers


async def wait_health(actor: object, status: str, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while actor.health().status != status:  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)


async def test_persistence_migrates_on_start_and_answers_pings(empty_pg_dsn: str) -> None:
    actor = Persistence(PostgresSettings(pool_min=1, pool_max=2), empty_pg_dsn, health_interval=0.1)
    await actor.start()
    try:
        await actor.wait_ready(10)
        shipped = [f"{m.version:04d}_{m.name}" for m in migrations.discover()]
        assert actor.migrated == shipped
        assert await actor.ask(ListAgents(), timeout=5) == []  # a round trip
        conn = await asyncpg.connect(empty_pg_dsn)
        try:
            assert await migrations.status(conn) == {"applied": shipped, "pending": []}
        finally:
            await conn.close()
        await wait_health(actor, "pass")
        assert actor.health().observed_ms is not None
    finally:
        await actor.stop()


async def test_a_database_down_at_boot_degrades_health_then_recovers_without_restart(
    state_dir: Path,
) -> None:
    """READY must not depend on the database: the actor starts, reports why it
    is failing, and connects once the server appears."""
    pg = EmbeddedPostgres(state_dir, run_as=RunAs.resolve(EMBEDDED_ACCOUNT), server_options=FAST_PG)
    actor = Persistence(
        PostgresSettings(pool_min=1, pool_max=2, connect_timeout=1), pg.dsn, health_interval=0.1
    )
    await actor.start()
    try:
        await wait_health(actor, "fail")
        assert "not connected" in actor.health().detail
        with pytest.raises(Unavailable, match="not connected"):
            await actor.ask(ListAgents(), timeout=5)
        await pg.start()
        await actor.wait_ready(30)
        await wait_health(actor, "pass")
        assert actor.stats.crashes == 0
    finally:
        await actor.stop()
        await pg.stop()


async def test_a_restarted_database_is_picked_up_by_the_pool(state_dir: Path) -> None:
    pg = EmbeddedPostgres(state_dir, run_as=RunAs.resolve(EMBEDDED_ACCOUNT), server_options=FAST_PG)
    await pg.start()
    actor = Persistence(
        PostgresSettings(pool_min=2, pool_max=2, connect_timeout=1), pg.dsn, health_interval=0.1
    )
    await actor.start()
    try:
        await actor.wait_ready(10)
        await pg.terminate(10)  # the server goes away under open pool connections
        await wait_health(actor, "fail")
        with pytest.raises(Unavailable):
            await actor.ask(ListAgents(), timeout=5)
        pg._state = pg.state.RESTARTING
        await pg.start()
        await wait_health(actor, "pass")
        assert await actor.ask(ListAgents(), timeout=5) == []
    finally:
        await actor.stop()
        await pg.stop()


async def test_redis_link_pings_and_reports_server_facts(servers: Servers) -> None:
    actor = RedisLink(RedisSettings(), servers.redis_url, health_interval=0.1)
    await actor.start()
    try:
        assert await actor.ask(RedisPing(), timeout=5) > 0
        info = await actor.ask(RedisInfo(), timeout=5)
        assert info["version"]
        assert info["prefix"] == "jarvis:"
        await wait_health(actor, "pass")
    finally:
        await actor.stop()


async def test_redis_down_fails_health_and_asks_with_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    actor = RedisLink(
        RedisSettings(connect_timeout=0.5), f"redis://127.0.0.1:{port}/0", health_interval=0.1
    )
    await actor.start()
    try:
        await wait_health(actor, "fail")
        assert "unreachable" in actor.health().detail
        with pytest.raises(RedisUnavailable, match="unreachable"):
            await actor.ask(RedisPing(), timeout=5)
    finally:
        await actor.stop()


async def test_readiness_follows_the_pool_across_a_restart(empty_pg_dsn: str) -> None:
    actor = Persistence(PostgresSettings(pool_min=1, pool_max=2), empty_pg_dsn, health_interval=0.1)
    await actor.start()
    await actor.wait_ready(10)
    await actor.stop()
    with pytest.raises(TimeoutError):
        await actor.wait_ready(0.2)  # no pool: not ready, whatever it was before
    waiter = asyncio.create_task(actor.wait_ready(10))  # waiting from before the restart
    actor._state = actor.state.RESTARTING
    await actor.start()
    try:
        await asyncio.wait_for(waiter, 10)
        assert actor.pool() is not None
    finally:
        await actor.stop()
