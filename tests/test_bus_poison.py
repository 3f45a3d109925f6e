"""Whatever one envelope holds, it is its own outcome: dead-lettered once, on
its first delivery, with the true reason; never a crash of the bus, never a
daemon that stops, never a reader that goes silent, never row data in a log."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import structlog
from redis.exceptions import OutOfMemoryError

from actors.embedded import EMBEDDED_ACCOUNT, EmbeddedValkey, RunAs
from actors.redis_link import connect_redis
from config import LoadedConfig
from tests.servers import make_state_dir
from tests.test_bus import BUS, dead_letters, drained, eventually, requested, stream_of
from tests.test_http import Running, start_daemon

NUL_PARAMETERS = {"path": "/tmp/a\u0000b"}


@pytest.fixture
async def daemon(make_config: Callable[..., LoadedConfig]) -> AsyncIterator[Running]:
    # The budget that two crashes in a row would have spent: the daemon must never spend it.
    loaded = make_config(bus=BUS, supervisor={"max_restarts": 1, "restart_window": 60})
    async for running in start_daemon(loaded):
        await running.wait_ready()
        yield running


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()


def bus_counters(running: Running) -> tuple[int, int]:
    snap = running.daemon.supervisor.get("bus").snapshot()
    return snap["crashes"], snap["restarts"]


async def subscribed(raw: aioredis.Redis, channel: str) -> bool:
    counts: Any = await raw.pubsub_numsub(channel)
    return bool(counts) and int(counts[0][1]) > 0


async def test_nul_in_parameters_is_dead_lettered_once_on_first_delivery_and_the_bus_goes_on(
    daemon: Running, raw: aioredis.Redis, db: asyncpg.Connection
) -> None:
    stream = stream_of(daemon)
    for n in range(3):  # one at a time: each alone in its batch, as the attack sent them
        await raw.xadd(stream, {"envelope": requested(f"nul-{n}", parameters=NUL_PARAMETERS)})
        await eventually(lambda n=n: _count(raw, daemon, n + 1))
    await raw.xadd(stream, {"envelope": requested("after-nul")})
    await eventually(lambda: drained(raw, daemon))
    letters = await dead_letters(raw, daemon)
    assert [letter["deliveries"] for letter in letters] == ["1", "1", "1"]
    assert all("NUL" in letter["reason"] for letter in letters), letters
    for letter in letters:  # deleted from the inbox at once, not left for the trim
        assert await raw.xrange(stream, letter["entry"], letter["entry"]) == []
    assert "$.data.parameters.path" in letters[0]["reason"]
    assert await db.fetchval("SELECT array_agg(request_id) FROM commands") == ["after-nul"]
    assert bus_counters(daemon) == (0, 0)
    assert not daemon.task.done()


async def _count(raw: aioredis.Redis, running: Running, n: int) -> bool:
    return len(await dead_letters(raw, running)) >= n


async def test_nul_by_publish_is_dead_lettered_and_the_next_publish_is_still_handled(
    daemon: Running, raw: aioredis.Redis, db: asyncpg.Connection
) -> None:
    stream = stream_of(daemon)
    await eventually(lambda: subscribed(raw, stream))
    await raw.publish(stream, requested("pub-nul", parameters=NUL_PARAMETERS))
    await eventually(lambda: _count(raw, daemon, 1))
    assert await raw.publish(stream, requested("pub-after")) >= 1  # someone still listens

    async def committed() -> bool:
        return await db.fetchval("SELECT count(*) FROM commands") == 1

    await eventually(committed)
    (letter,) = await dead_letters(raw, daemon)
    assert (letter["path"], letter["deliveries"]) == ("publish", "1")
    assert "NUL" in letter["reason"]
    assert bus_counters(daemon) == (0, 0)


async def test_a_source_longer_than_its_column_is_refused_when_parsed_and_its_batch_goes_in(
    daemon: Running, raw: aioredis.Redis, db: asyncpg.Connection
) -> None:
    stream = stream_of(daemon)
    async with raw.pipeline(transaction=False) as pipe:
        for i in range(2000):
            doc = json.loads(requested(f"src-{i}"))
            if i % 1000 == 500:
                doc["source"] = "s" * 150  # the schema said 200, the column 100
            pipe.xadd(stream, {"envelope": json.dumps(doc)})
        await pipe.execute()
    await eventually(lambda: drained(raw, daemon))
    assert await db.fetchval("SELECT count(*) FROM commands") == 1998
    letters = await dead_letters(raw, daemon)
    assert [letter["deliveries"] for letter in letters] == ["1", "1"]
    assert all("length <= 100" in letter["reason"] for letter in letters), letters
    assert bus_counters(daemon) == (0, 0)


async def test_a_row_postgresql_refuses_is_dead_lettered_with_a_reason_and_no_row_data_logged(
    daemon: Running, raw: aioredis.Redis, db: asyncpg.Connection
) -> None:
    # A rule the parser cannot know of: PostgreSQL refuses the row, with its
    # data in the error's DETAIL.
    await db.execute(
        "ALTER TABLE commands ADD CONSTRAINT no_forbidden_app "
        "CHECK (parameters->>'app' IS DISTINCT FROM 'forbidden-secret-value')"
    )
    stream = stream_of(daemon)
    with structlog.testing.capture_logs() as logs:
        async with raw.pipeline(transaction=False) as pipe:
            for i in range(50):
                app = "forbidden-secret-value" if i == 17 else "mail"
                pipe.xadd(stream, {"envelope": requested(f"row-{i}", parameters={"app": app})})
            await pipe.execute()
        await eventually(lambda: drained(raw, daemon))
    assert await db.fetchval("SELECT count(*) FROM commands") == 49
    (letter,) = await dead_letters(raw, daemon)
    assert letter["deliveries"] == "1"
    assert "no_forbidden_app" in letter["reason"]
    assert "forbidden-secret-value" not in letter["reason"]
    assert not [e for e in logs if "forbidden-secret-value" in repr(e)], logs
    assert bus_counters(daemon) == (0, 0)


async def test_a_reader_that_fails_is_a_crash_the_supervisor_restarts_never_silence(
    daemon: Running, raw: aioredis.Redis, db: asyncpg.Connection
) -> None:
    bus: Any = daemon.daemon.supervisor.get("bus")
    stream = stream_of(daemon)
    await eventually(lambda: subscribed(raw, stream))
    real = bus.published._handle
    failures = [RuntimeError("the fire-and-forget reader broke")]

    async def breaks_once(batch: Any) -> None:
        if failures:
            raise failures.pop()
        await real(batch)

    bus.published._handle = breaks_once
    await raw.publish(stream, requested("lost-in-the-crash"))

    async def restarted() -> bool:
        return bus_counters(daemon) == (1, 1) and bus.state.value == "running"

    await eventually(restarted)
    await eventually(lambda: subscribed(raw, stream))
    await raw.publish(stream, requested("after-restart"))

    async def committed() -> bool:
        return await db.fetchval("SELECT count(*) FROM commands") == 1

    await eventually(committed)
    assert not daemon.task.done()
    await asyncio.sleep(0)


async def test_when_redis_refuses_dead_letters_for_memory_the_entries_still_leave_the_inbox(
    make_config: Callable[..., LoadedConfig], db: asyncpg.Connection
) -> None:
    """Out of memory (noeviction), a dead letter cannot be written: the bad
    entries are still acknowledged and deleted, or they would hold the
    memory for ever and every write after them would fail."""
    folder = make_state_dir("jarvisd-oom-")
    small = EmbeddedValkey(folder, run_as=RunAs.resolve(EMBEDDED_ACCOUNT), appendonly=False)
    await small.start()
    raw = connect_redis(small.url, name="oom-test")
    try:
        loaded = make_config(redis={"url": small.url}, bus={**BUS, "shared_inbox": True})
        stream = loaded.settings.inbox
        await raw.xgroup_create(stream, "jarvisd", id="0", mkstream=True)
        for n in range(5):
            await raw.xadd(stream, {"envelope": requested(f"oom-{n}", parameters=NUL_PARAMETERS)})
        # Memory full: from here on Redis refuses what grows it (a dead letter's
        # XADD), and takes what frees it (XACK, XDEL).
        await raw.config_set("maxmemory", "1")
        with pytest.raises(OutOfMemoryError):
            await raw.xadd(f"{stream}:probe", {"x": "y"})
        async for running in start_daemon(loaded):

            async def gone() -> bool:
                return int(await raw.xlen(stream)) == 0

            await eventually(gone)
            bus = running.daemon.supervisor.get("bus").snapshot()
            assert bus["bus"]["deadLost"] == 5
            assert bus["crashes"] == 0
            groups = await raw.xinfo_groups(stream)
            assert groups[0]["pending"] == 0
    finally:
        await raw.aclose()
        await small.stop()
        shutil.rmtree(folder, ignore_errors=True)
