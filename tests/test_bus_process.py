"""The bus across real `jarvisd run` processes sharing PostgreSQL and Redis:
kill -9 in the middle of an ingest, two daemons on one stream, and a change
made with the CLI seen by another daemon at once."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.servers import SINGLE_AND_CLUSTER, make_state_dir, redis_url_for, stream_drained
from tests.test_daemon_process import DaemonProcess, get

pytestmark = pytest.mark.slow


@pytest.fixture(params=SINGLE_AND_CLUSTER)
def redis_url(request: pytest.FixtureRequest) -> str:
    """Every test here runs on one server and again on a Redis Cluster."""
    return redis_url_for(request)


@pytest.fixture
def folders() -> Iterator[list[Path]]:
    made = [make_state_dir("jarvisd-bus-") for _ in range(3)]
    yield made
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


def shared_env(pg_dsn: str, redis_url: str, prefix: str) -> dict[str, str]:
    return {
        "JARVISD_POSTGRES__DSN": pg_dsn,
        "JARVISD_REDIS__URL": redis_url,
        "JARVISD_REDIS__PREFIX": prefix,
        "JARVISD_BUS__STREAM": f"{prefix}inbox",
        "JARVISD_BUS__SHARED_INBOX": "true",
        "JARVISD_BUS__CLAIM_IDLE": "1",
        "JARVISD_BUS__CLAIM_INTERVAL": "0.3",
        "JARVISD_BUS__BLOCK_MS": "200",
        "JARVISD_DAEMON__LOG_FORMAT": "json",
    }


def consumer_of(folder: Path, name: str = "") -> str:
    place = hashlib.sha256(os.path.abspath(folder / "var").encode()).hexdigest()
    return f"{name or socket.gethostname()}-{place[:8]}"


def envelope(request_id: str) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "id": request_id,
            "type": "command.requested",
            "source": "load",
            "data": {"action": "noop", "riskScore": 90 if request_id.endswith("7") else 5},
        }
    ).encode()


async def produce(raw: aioredis.Redis, stream: str, ids: list[str], chunk: int = 500) -> None:
    for i in range(0, len(ids), chunk):
        async with raw.pipeline(transaction=False) as pipe:
            for rid in ids[i : i + chunk]:
                pipe.xadd(stream, {"envelope": envelope(rid)})
            await pipe.execute()
        await asyncio.sleep(0.01)


async def settled(
    raw: aioredis.Redis, stream: str, db: asyncpg.Connection, n: int, timeout: float
) -> None:
    async with asyncio.timeout(timeout):
        while True:
            count = await db.fetchval("SELECT count(*) FROM commands")
            if count == n and await stream_drained(raw, stream):
                return
            await asyncio.sleep(0.1)


async def check_exactly_once(
    db: asyncpg.Connection, raw: aioredis.Redis, stream: str, n: int
) -> None:
    assert await db.fetchval("SELECT count(*) FROM commands") == n
    assert await db.fetchval("SELECT count(DISTINCT request_id) FROM commands") == n
    assert await db.fetchval("SELECT count(*) FROM command_events") == n
    risky = await db.fetchval("SELECT count(*) FROM commands WHERE status = 'awaiting_approval'")
    assert await db.fetchval("SELECT count(*) FROM approval_requests") == risky
    assert await raw.xlen(f"{stream}:dead") == 0


async def test_kill_9_in_the_middle_of_an_ingest_then_a_restart_loses_and_doubles_nothing(
    folders: list[Path], pg_dsn: str, redis_url: str, redis_prefix: str, raw: aioredis.Redis
) -> None:
    env = shared_env(pg_dsn, redis_url, redis_prefix)
    stream = env["JARVISD_BUS__STREAM"]
    ids = [f"k9-{i}" for i in range(20_000)]
    db = await asyncpg.connect(pg_dsn)
    d = DaemonProcess(folders[0], env=env)
    try:
        d.wait_ready(30)
        producing = asyncio.create_task(produce(raw, stream, ids))
        async with asyncio.timeout(60):
            while await db.fetchval("SELECT count(*) FROM commands") < 3000:
                await asyncio.sleep(0.02)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        killed_at = await db.fetchval("SELECT count(*) FROM commands")
        await producing
        pending = await raw.xpending(stream, env.get("JARVISD_BUS__GROUP", "jarvisd"))
        d.stop()
        again = DaemonProcess(folders[0], env=env)  # the same consumer: its own pending first
        try:
            again.wait_ready(30)
            await settled(raw, stream, db, len(ids), timeout=120)
            stats = json.loads(get(again.port, "/stats")[1])["actors"]["bus"]["bus"]
        finally:
            again.proc.send_signal(signal.SIGTERM)
            again.proc.wait(30)
            again.stop()
        await check_exactly_once(db, raw, stream, len(ids))
        print(
            f"killed with {killed_at} committed and {pending['pending']} pending; "
            f"after restart: read {stats['read']}, acked {stats['acked']}"
        )
    finally:
        d.stop()
        await db.close()


async def test_three_daemons_share_one_stream_and_the_others_take_over_the_killed_ones_entries(
    folders: list[Path], pg_dsn: str, redis_url: str, redis_prefix: str, raw: aioredis.Redis
) -> None:
    env = shared_env(pg_dsn, redis_url, redis_prefix)
    stream = env["JARVISD_BUS__STREAM"]
    group = "jarvisd"
    ids = [f"three-{i}" for i in range(12_000)]
    db = await asyncpg.connect(pg_dsn)
    a, b, c = (
        DaemonProcess(folder, env={**env, "JARVISD_DAEMON__NAME": name})
        for folder, name in zip(folders, "abc", strict=True)
    )
    try:
        for d in (a, b, c):
            d.wait_ready(30)
        producing = asyncio.create_task(produce(raw, stream, ids))
        async with asyncio.timeout(60):
            while await db.fetchval("SELECT count(*) FROM commands") < 4000:
                await asyncio.sleep(0.02)
        # Freeze A with whatever it holds, then kill it: B and C must claim what it held.
        a.proc.send_signal(signal.SIGSTOP)
        held = await raw.xpending_range(
            stream, group, "-", "+", 10_000, consumername=consumer_of(folders[0], "a")
        )
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        await producing
        await settled(raw, stream, db, len(ids), timeout=120)
        await check_exactly_once(db, raw, stream, len(ids))
        consumers = {c["name"].decode(): c for c in await raw.xinfo_consumers(stream, group)}
        assert consumers[consumer_of(folders[0], "a")]["pending"] == 0  # all it held was taken over
        stats = [json.loads(get(d.port, "/stats")[1]) for d in (b, c)]
        assert [doc["daemon"] for doc in stats] == ["b", "c"]
        claimed = [doc["actors"]["bus"]["bus"]["claimed"] for doc in stats]
        assert sum(claimed) >= len(held)
        acked = [doc["actors"]["bus"]["bus"]["acked"] for doc in stats]
        print(f"A held {len(held)} entries when killed; B, C claimed {claimed}, acked {acked}")
    finally:
        for d in (a, b, c):
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGCONT)  # a stopped one would never see SIGTERM
                d.proc.send_signal(signal.SIGTERM)
                try:
                    d.proc.wait(30)
                except subprocess.TimeoutExpired:
                    d.proc.kill()
                    d.proc.wait(10)
            d.stop()
        await db.close()


def cli(
    folder: Path, env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    return subprocess.run(
        [sys.executable, "-m", "jarvisd", *args],
        cwd=folder,
        env={**base, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_user_disabled_with_the_cli_is_refused_by_another_daemon_within_a_second(
    folders: list[Path], pg_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    env = shared_env(pg_dsn, redis_url, redis_prefix)
    a, b = DaemonProcess(folders[0], env=env), DaemonProcess(folders[1], env=env)
    try:
        a.wait_ready(30)
        b.wait_ready(30)
        made = cli(
            folders[0],
            env,
            "user",
            "add",
            "leaving",
            "--role",
            "user",
            "--password-stdin",
            stdin="a long password\n",
        )
        assert made.returncode == 0, made.stderr
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"http://127.0.0.1:{b.port}/auth/login",
                json={"username": "leaving", "password": "a long password"},
            ) as resp:
                assert resp.status == 201
                session = (await resp.json())["token"]

            async def status() -> int:
                async with s.get(
                    f"http://127.0.0.1:{b.port}/commands",
                    headers={"Authorization": f"Bearer {session}"},
                ) as r:
                    return r.status

            assert await status() == 200
            disabled = cli(folders[0], env, "user", "disable", "leaving")
            assert disabled.returncode == 0, disabled.stderr
            started = time.monotonic()
            while await status() != 401:
                assert time.monotonic() - started < 1.0
                await asyncio.sleep(0.02)
    finally:
        for d in (a, b):
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
                d.proc.wait(30)
            d.stop()
