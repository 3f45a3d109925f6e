"""Cache benchmark: the cache actor's ask path against raw redis.asyncio, in the same run.

    python -m bench.cache [--callers 50] [--seconds 5]

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
from config import CacheSettings, RedisSettings


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


async def run(url: str, callers: int, seconds: float) -> None:
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
    print(f"  raw redis.asyncio pool        {raw_rate:10,.0f} ops/s")
    print(f"  one pipelined connection      {statistics.median(floor_rates):10,.0f} ops/s")
    print(f"  cache actor ask               {actor_rate:10,.0f} ops/s")
    print(f"  actor / raw pool              {actor_rate / raw_rate:10.2f}")

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
    print(f"invalidate a tag of {n:,} keys   {elapsed:10.1f} ms ({removed:,} removed)")

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    url = os.environ.get("JARVISD_TEST_REDIS_URL")
    if url:
        asyncio.run(run(url, args.callers, args.seconds))
        return
    from tests.servers import Servers

    servers = Servers.start(postgres=False)
    try:
        print(f"(embedded Valkey at {servers.redis_url})")
        asyncio.run(run(servers.redis_url, args.callers, args.seconds))
    finally:
        servers.stop()


if __name__ == "__main__":
    main()
