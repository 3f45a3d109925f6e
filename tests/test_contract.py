"""One failure contract, on a running daemon: every task has an owner that
sees it die (the HTTP actor included), the edge never waits for mailbox
room, one sweeper at a time, Redis blips cost envelopes nothing, and slow
cache work never holds up fast work."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from actors.approvals import SWEEPER_LOCK
from actors.cache import Cache, CacheGet, CacheInvalidatePattern
from actors.persistence import GetUser
from config import CacheSettings, LoadedConfig, RedisSettings
from jarvisd.daemon import Daemon
from tests.test_api import Api, serve_api
from tests.test_http import Running, start_daemon
from tests.test_systemd import Receiver, receiver  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def api(
    make_config: Callable[..., LoadedConfig], overrides: dict[str, Any]
) -> AsyncIterator[Api]:
    loaded = make_config(**overrides)
    async for client in serve_api(loaded):
        yield client


async def eventually(check: Callable[[], Any], timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


def crashes(daemon: Daemon) -> dict[str, int]:
    return {a.name: a.stats.crashes for a in daemon.supervisor.actors if a.stats.crashes}


# -- the HTTP edge never waits for room ----------------------------------------------------------
@pytest.mark.parametrize("overrides", [{"http": {"request_timeout": 30}}])
async def test_a_full_mailbox_is_answered_503_at_once_not_after_the_request_timeout(
    api: Api, pg_dsn: str
) -> None:
    daemon = api.r.daemon
    persistence = daemon.actors.persistence
    lock = await asyncpg.connect(pg_dsn)
    waiting: list[asyncio.Task[Any]] = []
    try:
        tx = lock.transaction()
        await tx.start()
        await lock.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")  # every GetUser waits
        # Every worker in a query that waits, then the mailbox full.
        asks = persistence.concurrency + persistence.mailbox_size
        waiting = [
            asyncio.create_task(persistence.ask(GetUser(user_id=1), timeout=60))
            for _ in range(asks)
        ]
        await eventually(lambda: _true(persistence.mailbox_depth == persistence.mailbox_size))
        elapsed: list[float] = []
        for _ in range(5):
            started = time.monotonic()
            status, headers, problem = await api.call("GET", "/users/1", local=True)
            elapsed.append(time.monotonic() - started)
            assert status == 503, problem
            assert headers["Retry-After"] == "1"
            assert "mailbox" in problem["detail"]
        # At once: request_timeout is 30 s; a wait for room would take that long.
        assert statistics.median(elapsed) < 0.05, elapsed
        assert max(elapsed) < 0.5, elapsed
        await tx.rollback()
    finally:
        await lock.close()
        await asyncio.gather(*waiting, return_exceptions=True)


async def _true(value: bool) -> bool:
    return value


# -- every task has an owner -----------------------------------------------------------------------
async def _boom(after: float = 0.0) -> None:
    await asyncio.sleep(after)
    raise RuntimeError("a task of the actor failed")


async def test_a_task_of_the_http_actor_that_dies_is_a_crash_and_the_listeners_come_back(
    api: Api,
) -> None:
    http = api.r.daemon.http
    port = http.bound_port
    http.spawn(_boom(), "boom")
    await eventually(lambda: _true(http.stats.restarts == 1 and http.state.value == "running"))
    assert http.stats.crashes == 1
    assert http.bound_port == port  # listening again, on the same address
    status, _h, _b = await api.call("GET", "/health/live")
    assert status == 200
    assert (await api.call("GET", "/users", local=True))[0] == 200  # the Unix socket too
    assert crashes(api.r.daemon) == {"http": 1}


async def test_when_the_http_actor_keeps_crashing_the_daemon_exits_1_and_the_watchdog_stops(
    make_config: Callable[..., LoadedConfig],
    receiver: Receiver,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jarvisd.systemd import Notifier

    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    loaded = make_config(supervisor={"max_restarts": 2, "restart_window": 60})
    daemon = Daemon(loaded, notifier=Notifier({"NOTIFY_SOCKET": receiver.address}))
    task = asyncio.create_task(daemon.run(handle_signals=False))
    async with asyncio.timeout(30):
        await daemon.ready.wait()
    crashed_at: list[float] = []
    async with asyncio.timeout(30):
        while not task.done():
            if daemon.http.state.value == "running":
                crashed_at.append(time.time())
                daemon.http.spawn(_boom(), "boom")
            await asyncio.sleep(0.05)
    assert task.result() == 1
    assert daemon.supervisor.escalation is not None
    assert "http" in str(daemon.supervisor.escalation)
    receiver.drain()
    pings = [t for t, m in list(receiver.messages) if m.get("WATCHDOG") == "1"]
    escalated = [t for t, m in list(receiver.messages) if "failed" in m.get("STATUS", "")]
    assert pings, "the watchdog pinged while all was well"
    assert escalated
    assert not [t for t in pings if t > escalated[0] + 0.06], "no ping once escalated"


async def test_a_task_of_the_daemon_that_dies_ends_the_daemon_with_exit_1(
    make_config: Callable[..., LoadedConfig],
) -> None:
    daemon = Daemon(make_config())
    task = asyncio.create_task(daemon.run(handle_signals=False))
    async with asyncio.timeout(30):
        await daemon.ready.wait()
    daemon._spawn(_boom(0.05), "daemon.test")
    assert await asyncio.wait_for(task, 30) == 1
    assert "a task of the actor failed" in daemon.failure


# -- one sweeper -----------------------------------------------------------------------------------
async def test_a_sweepers_connection_dropped_while_idle_leaves_exactly_one_sweeper(
    make_config: Callable[..., LoadedConfig], pg_dsn: str, tmp_path: Path
) -> None:
    runners, daemons = [], []
    try:
        for name in ("a", "b"):
            loaded = make_config(
                daemon={"name": name, "state_dir": str(tmp_path / name)},
                http={"unix_socket": str(tmp_path / f"{name}.sock")},
                approvals={"sweep_interval": 0.1},
            )
            runner = start_daemon(loaded)
            running: Running = await runner.__anext__()
            runners.append(runner)
            daemons.append(running.daemon)
        sweeps = [d.actors.approvals.sweep_stats for d in daemons]
        leads = [d.actors.approvals.lead for d in daemons]
        await eventually(
            lambda: _true(sum(x.leader for x in leads) == 1 and max(s.sweeps for s in sweeps) > 2)
        )
        admin = await asyncpg.connect(pg_dsn)
        try:
            # The leader's connection goes while it sleeps between sweeps.
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' "
                "AND granted AND classid = ($1::bigint >> 32)::oid "
                "AND objid = ($1::bigint & 4294967295)::oid",
                SWEEPER_LOCK,
            )
            assert killed == 1
            await eventually(lambda: _true(sum(x.leader for x in leads) == 1), timeout=10)
            await asyncio.sleep(0.5)  # both back to sweeping turns
            before = [s.sweeps for s in sweeps]
            await asyncio.sleep(2)  # 20 turns of each
            swept = [s.sweeps - b for s, b in zip(sweeps, before, strict=True)]
            holders = await admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid = ($1::bigint >> 32)::oid AND objid = ($1::bigint & 4294967295)::oid",
                SWEEPER_LOCK,
            )
        finally:
            await admin.close()
        assert holders == 1
        assert sorted(n > 0 for n in swept) == [False, True], swept  # one sweeper, not two
        assert sum(x.leader for x in leads) == 1
        for d in daemons:
            assert crashes(d) == {}
    finally:
        for runner in reversed(runners):
            with contextlib.suppress(StopAsyncIteration):
                await runner.__anext__()


# -- Redis blips cost envelopes nothing --------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    # A long block: the bus is in its read for the next batch while this one waits.
    [{"bus": {"shared_inbox": True, "max_deliveries": 1, "claim_idle": 600, "block_ms": 5000}}],
)
async def test_a_redis_blip_while_an_envelope_is_in_hand_is_not_counted_as_a_delivery(
    api: Api, pg_dsn: str, raw: aioredis.Redis
) -> None:
    daemon = api.r.daemon
    bus = daemon.actors.bus
    inbox = daemon.settings.inbox
    lock = await asyncpg.connect(pg_dsn)
    try:
        tx = lock.transaction()
        await tx.start()
        await lock.execute("LOCK TABLE commands IN ACCESS EXCLUSIVE MODE")  # the ingest waits
        envelope = {
            "v": 1,
            "id": "blip-1",
            "type": "command.requested",
            "data": {"action": "open_app"},
        }
        await raw.xadd(inbox, {"envelope": json.dumps(envelope)})
        await eventually(lambda: _true(bus.bus_stats.read == 1))
        # The blip: the connection the bus reads on goes, while the entry is in hand.
        readers = [c for c in await raw.client_list() if c["name"] == "jarvisd-bus-reader"]
        assert readers
        for client in readers:
            await raw.client_kill_filter(_id=client["id"])
        await eventually(lambda: _true(bus.bus_stats.read >= 2))  # read again, first
        pending = await raw.xpending_range(inbox, bus.settings.group, "-", "+", 10)
        assert [p["times_delivered"] for p in pending] == [2]  # Redis counts two
        await tx.rollback()  # the database takes the command now
        await eventually(lambda: _true(bus.bus_stats.acked == 1))
    finally:
        await lock.close()
    assert bus.bus_stats.dead == 0  # max_deliveries is 1: the blip was no delivery
    assert bus.bus_stats.redis_errors >= 1
    assert await raw.xlen(f"{inbox}:dead") == 0
    status, _h, page = await api.call("GET", "/commands?requestId=blip-1", local=True)
    assert status == 200
    assert [c["status"] for c in page["items"]] == ["approved"]
    assert crashes(daemon) == {}


@pytest.mark.parametrize(
    # An inbox to read (the shared one): with none, the bus has nothing to block on.
    "overrides",
    [{"bus": {"block_ms": 2500, "shared_inbox": True}, "redis": {"connect_timeout": 1}}],
)
async def test_a_block_longer_than_the_redis_timeout_reads_without_errors(api: Api) -> None:
    bus = api.r.daemon.actors.bus
    await asyncio.sleep(6)  # two blocks and more, with nothing to read
    assert bus.bus_stats.redis_errors == 0
    assert bus.bus_stats.last_error == ""
    assert bus.stats.crashes == 0


# -- the cache: fast work never waits behind slow work --------------------------------------------------
async def test_gets_sent_with_a_slow_scan_are_answered_before_it_ends(
    redis_url: str, redis_prefix: str, raw: aioredis.Redis
) -> None:
    async with raw.pipeline(transaction=False) as pipe:  # a keyspace that takes a while to scan
        for i in range(200_000):
            pipe.set(f"{redis_prefix}bulk:{i}", b"x")
            if i % 10_000 == 9_999:
                await pipe.execute()
    cache = Cache(RedisSettings(prefix=redis_prefix), CacheSettings(), redis_url, concurrency=1)
    await cache.start()
    try:
        await cache.ask(CacheGet("ns", "warm"), timeout=10)
        scan = asyncio.create_task(cache.ask(CacheInvalidatePattern("ns", "nothing*"), timeout=60))
        gets = [
            asyncio.create_task(cache.ask(CacheGet("ns", f"k{i}"), timeout=60)) for i in range(50)
        ]
        done, _pending = await asyncio.wait(gets, timeout=30)
        assert len(done) == 50
        assert not scan.done(), "the gets waited for the scan"
        assert await scan == 0
    finally:
        await cache.stop()
