"""Cache benchmark: the cache actor's ask path against raw redis.asyncio, in the same run.

    python -m bench.cache [--callers 50] [--seconds 3] [--json FILE]

Servers: JARVISD_TEST_REDIS_URL, else an embedded Valkey (as the tests do).
Prints ops/s for a raw client pool, one hand-pipelined connection, and the
actor; the actor/raw ratio; and the time to invalidate a tag of 10,000 keys.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from actors.cache import Cache, CacheGet, CacheInvalidateTags, CacheSet
from bench.daemon import run_bench
from bench.report import Report
from config import CacheSettings, RedisSettings
from tests.servers import Servers


async def closed_loop(
    callers: int, seconds: float, op: Callable[[int, int], Awaitable[object]]
) -> float:
    """``callers`` tasks each issue ops back to back for ``seconds``; returns ops/s."""
    deadline = time.perf_counter() + seconds
    counts = [0] * callers

    async def caller(c: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            await op(c, i)
            i += 1
        counts[c] = i

    started = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    return sum(counts) / (time.perf_counter() - started)


async def run(url: str, callers: int, seconds: float, report: Report) -> None:
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    value = b'{"user":7,"name":"bench","roles":["user"]}'

    raw = aioredis.Redis.from_url(url, max_connections=callers)
    await raw.ping()

    async def raw_op(c: int, i: int) -> object:
        key = f"{prefix}raw:{c}:{i % 100}"
        return await (raw.set(key, value, px=60_000) if i % 2 == 0 else raw.get(key))

    one = aioredis.Redis.from_url(url)

    async def pipelined_floor() -> float:
        """What one connection does when every op waiting is sent as one pipeline."""
        deadline = time.perf_counter() + seconds
        done = 0
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            pipe = one.pipeline(transaction=False)
            for c in range(callers):
                key = f"{prefix}pipe:{c}:{done % 100}"
                pipe.set(key, value, px=60_000) if done % 2 == 0 else pipe.get(key)
            await pipe.execute()
            done += callers
        return done / (time.perf_counter() - started)

    cache = Cache(RedisSettings(prefix=prefix), CacheSettings(), url, concurrency=4)
    await cache.start()

    async def actor_op(c: int, i: int) -> object:
        key = f"{c}:{i % 100}"
        if i % 2 == 0:
            return await cache.ask(
                CacheSet("bench", key, {"user": 7, "name": "bench"}, ttl_ms=60_000)
            )
        return await cache.ask(CacheGet("bench", key))

    rounds = 3
    raw_rates, actor_rates, floor_rates = [], [], []
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits both alike
        raw_rates.append(await closed_loop(callers, seconds, raw_op))
        actor_rates.append(await closed_loop(callers, seconds, actor_op))
        floor_rates.append(await pipelined_floor())
    raw_rate, actor_rate = statistics.median(raw_rates), statistics.median(actor_rates)
    print(f"get/set, {callers} concurrent callers, {rounds} x {seconds:g}s each (median):")
    report.add("get/set, raw redis.asyncio pool", raw_rate, "ops/s")
    report.add("get/set, one pipelined connection", statistics.median(floor_rates), "ops/s")
    report.add(
        "get/set, cache actor ask",
        actor_rate,
        "ops/s",
        floor=raw_rate,
        floor_name="raw redis.asyncio pool",
    )

    n = 10_000
    await asyncio.gather(
        *(
            cache.ask(CacheSet("bench", f"tagged:{i}", i, ttl_ms=600_000, tags=("big",)))
            for i in range(n)
        )
    )
    started = time.perf_counter()
    removed = await cache.ask(CacheInvalidateTags("bench", ("big",)), timeout=30)
    elapsed = (time.perf_counter() - started) * 1000
    report.add(f"invalidate a tag of {n:,} keys", elapsed, "ms", note=f"{removed:,} removed")

    await cache.stop()
    cursor = 0
    while True:  # clean up our prefix only
        cursor, keys = await raw.scan(cursor=cursor, match=f"{prefix}*", count=1000)
        if keys:
            await raw.unlink(*keys)
        if cursor == 0:
            break
    await raw.aclose()
    await one.aclose()


async def http_rates(
    url: str, pg_admin_dsn: str, callers: int, seconds: float, report: Report
) -> None:
    """GET /cache/get/{key} on a real `jarvisd run` (another process), against
    GET /health/live (the same HTTP stack, no actor, no Redis) as the floor."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    import aiohttp
    import asyncpg

    from tests.servers import dsn_with_database

    name = f"jarvisd_bench_http_{os.getpid()}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    folder = tempfile.mkdtemp(prefix="jarvisd-bench-")
    port = 18000 + os.getpid() % 1000
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    env.update(
        JARVISD_POSTGRES__DSN=dsn_with_database(pg_admin_dsn, name),
        JARVISD_REDIS__URL=url,
        JARVISD_REDIS__PREFIX=f"bench-http:{uuid.uuid4().hex[:6]}:",
        JARVISD_DAEMON__STATE_DIR=folder,
        JARVISD_HTTP__PORT=str(port),
        JARVISD_DAEMON__LOG_LEVEL="warning",
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - once, at bench start
        [sys.executable, "-m", "jarvisd", "run"],
        env=env,
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    token_file = os.path.join(folder, "admin-token")
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=callers)) as session:
            deadline = time.monotonic() + 60
            while not os.path.exists(token_file):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the daemon did not come up")
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.2)
            with open(token_file) as fh:  # noqa: ASYNC230 - a few bytes, once
                headers = {"Authorization": f"Bearer {fh.read().strip()}"}
            # A session token is checked in Redis (one hop) rather than PostgreSQL.
            async with session.post(
                f"{base}/users/1/tokens", headers=headers, json={"name": "bench"}
            ) as r:
                assert r.status == 201, await r.text()
            async with session.post(
                f"{base}/cache/set",
                headers=headers,
                json={"key": "hot", "value": {"user": 7, "name": "bench"}, "ttl": 600},
            ) as r:
                assert r.status == 200, await r.text()

            async def get(path: str) -> Callable[[int, int], Awaitable[object]]:
                async def op(_c: int, _i: int) -> object:
                    async with session.get(base + path, headers=headers) as resp:
                        assert resp.status == 200, resp.status
                        return await resp.read()

                return op

            live, cached = await get("/health/live"), await get("/cache/get/hot")
            live_rates, cache_rates = [], []
            for _ in range(3):
                live_rates.append(await closed_loop(callers, seconds, live))
                cache_rates.append(await closed_loop(callers, seconds, cached))
        floor, rate = statistics.median(live_rates), statistics.median(cache_rates)
        print(f"HTTP on a separate `jarvisd run`, {callers} concurrent clients (median of 3):")
        report.add("HTTP GET /health/live", floor, "req/s")
        report.add(
            "HTTP GET /cache/get/{key} (API token)",
            rate,
            "req/s",
            floor=floor,
            floor_name="GET /health/live",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()

    async def both(servers: Servers, report: Report) -> None:
        await run(servers.redis_url, args.callers, args.seconds, report)
        await http_rates(
            servers.redis_url, servers.postgres_dsn, args.callers, args.seconds, report
        )

    run_bench("cache", args.json, both)


if __name__ == "__main__":
    main()
