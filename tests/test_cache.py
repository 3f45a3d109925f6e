"""The cache actor against a real Redis/Valkey (DESIGN §7)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from actors import MailboxFull
from actors.cache import (
    Cache,
    CacheDelete,
    CacheError,
    CacheExists,
    CacheFlush,
    CacheGet,
    CacheInvalidatePattern,
    CacheInvalidateTags,
    CacheSet,
    CacheStatsQuery,
    CacheUnavailable,
)
from actors.embedded import EMBEDDED_ACCOUNT, EmbeddedValkey, RunAs
from config import CacheSettings, RedisSettings
from tests.servers import SINGLE_AND_CLUSTER, redis_url_for, until_gone


@pytest.fixture(params=SINGLE_AND_CLUSTER)
def redis_url(request: pytest.FixtureRequest) -> str:
    """Every test here runs on one server and again on a Redis Cluster."""
    return redis_url_for(request)


@pytest.fixture
async def cache(redis_url: str, redis_prefix: str) -> AsyncIterator[Cache]:
    actor = Cache(RedisSettings(prefix=redis_prefix), CacheSettings(default_ttl=60), redis_url)
    await actor.start()
    yield actor
    await actor.stop()


async def ask(cache: Cache, msg: Any) -> Any:
    return await cache.ask(msg, timeout=30)


async def test_set_then_get_round_trips_json_values(cache: Cache) -> None:
    value = {"name": "Ada", "roles": ["admin"], "n": 3, "ok": True}
    assert await ask(cache, CacheSet("users", "u:1", value))
    assert await ask(cache, CacheGet("users", "u:1")) == (True, value)


async def test_a_cached_null_is_a_hit_and_a_missing_key_a_miss(cache: Cache) -> None:
    await ask(cache, CacheSet("ns", "nothing", None))
    assert await ask(cache, CacheGet("ns", "nothing")) == (True, None)
    assert await ask(cache, CacheGet("ns", "absent")) == (False, None)
    stats = (await ask(cache, CacheStatsQuery("ns")))["ns"]
    assert (stats["hits"], stats["misses"]) == (1, 1)


async def test_bytes_pass_through_raw(cache: Cache, raw: aioredis.Redis, redis_prefix: str) -> None:
    await ask(cache, CacheSet("blobs", "b", b"\x00\xffraw"))
    assert await raw.get(f"{redis_prefix}cache:blobs:b") == b"\x00\xffraw"
    assert await ask(cache, CacheGet("blobs", "b", raw=True)) == (True, b"\x00\xffraw")


async def test_nx_on_an_existing_key_is_refused_and_changes_nothing(cache: Cache) -> None:
    await ask(cache, CacheSet("ns", "k", "first"))
    assert not await ask(cache, CacheSet("ns", "k", "second", mode="NX"))
    assert await ask(cache, CacheGet("ns", "k")) == (True, "first")
    assert (await ask(cache, CacheStatsQuery("ns")))["ns"]["nxRefused"] == 1


async def test_xx_on_a_missing_key_is_refused_and_creates_nothing(cache: Cache) -> None:
    assert not await ask(cache, CacheSet("ns", "k", "v", mode="XX"))
    assert await ask(cache, CacheExists("ns", ("k",))) == 0
    assert await ask(cache, CacheSet("ns", "k", "v"))
    assert await ask(cache, CacheSet("ns", "k", "w", mode="XX"))
    assert await ask(cache, CacheGet("ns", "k")) == (True, "w")
    assert (await ask(cache, CacheStatsQuery("ns")))["ns"]["xxRefused"] == 1


async def test_ttl_is_precise_to_the_millisecond_and_defaults_from_config(
    cache: Cache, raw: aioredis.Redis, redis_prefix: str
) -> None:
    await ask(cache, CacheSet("ns", "ms", 1, ttl_ms=1500))
    await ask(cache, CacheSet("ns", "default", 1))
    ms = await raw.pttl(f"{redis_prefix}cache:ns:ms")
    assert 1400 <= ms <= 1500
    assert 59_000 <= await raw.pttl(f"{redis_prefix}cache:ns:default") <= 60_000
    await ask(cache, CacheSet("ns", "short", 1, ttl_ms=50))
    assert await ask(cache, CacheGet("ns", "short")) == (True, 1)
    await until_gone(raw, f"{redis_prefix}cache:ns:short")
    assert await ask(cache, CacheGet("ns", "short")) == (False, None)


async def test_keepttl_keeps_the_remaining_ttl(
    cache: Cache, raw: aioredis.Redis, redis_prefix: str
) -> None:
    await ask(cache, CacheSet("ns", "k", 1, ttl_ms=5000))
    await ask(cache, CacheSet("ns", "k", 2, keepttl=True))
    assert 4000 < await raw.pttl(f"{redis_prefix}cache:ns:k") <= 5000
    assert await ask(cache, CacheGet("ns", "k")) == (True, 2)
    with pytest.raises(CacheError, match="exclude"):
        await ask(cache, CacheSet("ns", "k", 3, keepttl=True, ttl_ms=10))


async def test_keepttl_on_a_new_key_gives_it_the_default_ttl_never_none(
    cache: Cache, raw: aioredis.Redis, redis_prefix: str
) -> None:
    await ask(cache, CacheSet("ns", "fresh", 1, keepttl=True))
    assert 59_000 < await raw.pttl(f"{redis_prefix}cache:ns:fresh") <= 60_000


async def test_sets_and_gets_pipelined_together_then_delete_and_exists(cache: Cache) -> None:
    sets = [CacheSet("ns", k, v, ttl_ms=10_000) for k, v in (("a", 1), ("b", [2]), ("c", None))]
    assert await asyncio.gather(*(ask(cache, m) for m in sets)) == [True, True, True]
    gets = [CacheGet("ns", k) for k in ("a", "b", "c", "d")]
    assert await asyncio.gather(*(ask(cache, m) for m in gets)) == [
        (True, 1),
        (True, [2]),
        (True, None),
        (False, None),
    ]
    assert await ask(cache, CacheExists("ns", ("a", "b", "d"))) == 2
    assert await ask(cache, CacheDelete("ns", ("a", "d"))) == 1
    assert await ask(cache, CacheExists("ns", ("a",))) == 0


async def test_bad_input_is_a_clear_error_and_changes_nothing(
    cache: Cache, raw: aioredis.Redis, redis_prefix: str
) -> None:
    cases = [
        (CacheSet("bad ns", "k", 1), "namespace"),
        (CacheSet("ns", "", 1), "must not be empty"),
        (CacheSet("ns", "k" * 5000, 1), "longer than"),
        (CacheSet("ns", "k", 1, ttl_ms=0), "ttl must be positive"),
        (CacheSet("ns", "k", "x" * 600_000), "over the limit"),
        (CacheSet("ns", "k", 1, tags=tuple(f"t{i}" for i in range(100))), "at most"),
        (CacheInvalidateTags("ns", ()), "at least one tag"),
    ]
    for msg, match in cases:
        with pytest.raises(CacheError, match=match):
            await ask(cache, msg)
    assert [k async for k in raw.scan_iter(match=f"{redis_prefix}*")] == []


async def test_a_bad_message_in_a_batch_fails_alone(cache: Cache) -> None:
    results = await asyncio.gather(
        ask(cache, CacheSet("ns", "good", 1)),
        ask(cache, CacheSet("ns", "", 1)),
        ask(cache, CacheGet("ns", "good")),
        return_exceptions=True,
    )
    assert results[0] is True
    assert isinstance(results[1], CacheError)
    assert results[2] in ((True, 1), (False, None))  # same batch: the get may run before the set


async def test_a_tag_set_lives_at_least_as_long_as_its_longest_key(
    cache: Cache, raw: aioredis.Redis, redis_prefix: str
) -> None:
    tag_key = f"{redis_prefix}cache-tag:ns:group"
    await ask(cache, CacheSet("ns", "long", 1, ttl_ms=100_000, tags=("group",)))
    await ask(cache, CacheSet("ns", "short", 1, ttl_ms=1_000, tags=("group",)))
    assert 99_000 < await raw.pttl(tag_key) <= 100_000  # not shrunk to the last key's TTL
    await ask(cache, CacheSet("ns", "longer", 1, ttl_ms=200_000, tags=("group",)))
    assert 199_000 < await raw.pttl(tag_key) <= 200_000
    # KEEPTTL on a new key: the default TTL (60 s here); the tag set keeps its longer one.
    await ask(cache, CacheSet("ns", "new", 1, keepttl=True, tags=("group",)))
    assert 59_000 < await raw.pttl(f"{redis_prefix}cache:ns:new") <= 60_000
    assert 199_000 < await raw.pttl(tag_key) <= 200_000


async def test_a_tagged_set_refused_by_nx_adds_no_membership(
    cache: Cache, raw: aioredis.Redis, redis_prefix: str
) -> None:
    await ask(cache, CacheSet("ns", "k", 1))
    assert not await ask(cache, CacheSet("ns", "k", 2, mode="NX", tags=("t",)))
    assert await raw.exists(f"{redis_prefix}cache-tag:ns:t") == 0


async def test_invalidating_a_tag_removes_its_members_even_after_some_expired(
    cache: Cache, raw: aioredis.Redis, redis_prefix: str
) -> None:
    for i in range(5):
        await ask(cache, CacheSet("ns", f"k{i}", i, ttl_ms=60_000, tags=("user:7",)))
    for i in range(5, 8):
        await ask(cache, CacheSet("ns", f"k{i}", i, ttl_ms=30, tags=("user:7",)))
    await ask(cache, CacheSet("ns", "other", 1, tags=("user:8",)))
    await until_gone(raw, *(f"{redis_prefix}cache:ns:k{i}" for i in range(5, 8)))
    assert await ask(cache, CacheInvalidateTags("ns", ("user:7",))) == 5
    assert await ask(cache, CacheExists("ns", tuple(f"k{i}" for i in range(8)))) == 0
    assert await raw.exists(f"{redis_prefix}cache-tag:ns:user:7") == 0
    assert await ask(cache, CacheGet("ns", "other")) == (True, 1)
    assert (await ask(cache, CacheStatsQuery("ns")))["ns"]["invalidated"] == 5


async def test_tag_invalidation_never_deletes_outside_the_namespace(
    cache: Cache, raw: aioredis.Redis, redis_prefix: str
) -> None:
    await ask(cache, CacheSet("ns", "mine", 1, tags=("t",)))
    outside = f"{redis_prefix}elsewhere"
    await raw.set(outside, "keep")
    await raw.sadd(f"{redis_prefix}cache-tag:ns:t", outside)  # a polluted tag set
    assert await ask(cache, CacheInvalidateTags("ns", ("t",))) == 1
    assert await raw.get(outside) == b"keep"


async def test_pattern_invalidation_over_50000_keys_spares_other_namespaces_and_prefixes(
    cache: Cache, raw: aioredis.Redis, redis_prefix: str
) -> None:
    n = 50_000
    async with raw.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.set(f"{redis_prefix}cache:big:item:{i}", "x", px=600_000)
        for i in range(100):
            pipe.set(f"{redis_prefix}cache:big:keep:{i}", "x", px=600_000)
            pipe.set(f"{redis_prefix}cache:other:item:{i}", "x", px=600_000)
        await pipe.execute()
    bystander = f"unprefixed-{redis_prefix}item:1"
    await raw.set(bystander, "x", px=600_000)
    try:
        assert await ask(cache, CacheInvalidatePattern("big", "item:*")) == n
        assert await raw.exists(*[f"{redis_prefix}cache:other:item:{i}" for i in range(100)]) == 100
        assert await raw.exists(*[f"{redis_prefix}cache:big:keep:{i}" for i in range(100)]) == 100
        assert await raw.exists(bystander) == 1
    finally:
        await raw.delete(bystander)


async def test_a_pattern_cannot_reach_out_of_its_namespace(
    cache: Cache, raw: aioredis.Redis, redis_prefix: str
) -> None:
    await raw.set(f"{redis_prefix}cache:other:x", 1)
    await raw.set(f"{redis_prefix}cache:ns-ish:x", 1)
    for pattern in ("*", "../other:*", "[a-z]*", "\\*"):
        await ask(cache, CacheInvalidatePattern("ns", pattern))
    assert await raw.exists(f"{redis_prefix}cache:other:x", f"{redis_prefix}cache:ns-ish:x") == 2


async def test_flush_removes_the_namespace_only(
    cache: Cache, raw: aioredis.Redis, redis_prefix: str
) -> None:
    for i in range(20):
        await ask(cache, CacheSet("gone", f"k{i}", i, tags=("t",)))
        await ask(cache, CacheSet("stays", f"k{i}", i, tags=("t",)))
    assert await ask(cache, CacheFlush("gone")) == 20
    assert [k async for k in raw.scan_iter(match=f"{redis_prefix}cache*:gone:*")] == []
    assert await ask(cache, CacheExists("stays", tuple(f"k{i}" for i in range(20)))) == 20
    assert await raw.exists(f"{redis_prefix}cache-tag:stays:t") == 1


async def test_stats_count_exactly(cache: Cache) -> None:
    await ask(cache, CacheSet("s", "a", 1))
    await ask(cache, CacheSet("s", "a", 1, mode="NX"))
    await ask(cache, CacheSet("s", "b", 1, mode="XX"))
    await ask(cache, CacheSet("s", "c", 1))
    await ask(cache, CacheSet("s", "d", 2))
    await ask(cache, CacheGet("s", "a"))
    await ask(cache, CacheGet("s", "c"))
    await ask(cache, CacheGet("s", "zz"))
    await ask(cache, CacheDelete("s", ("c", "zz")))
    await ask(cache, CacheSet("s", "t", 1, tags=("x",)))
    await ask(cache, CacheInvalidateTags("s", ("x",)))
    doc = (await ask(cache, CacheStatsQuery("s")))["s"]
    assert {
        k: doc[k]
        for k in (
            "hits",
            "misses",
            "sets",
            "nxRefused",
            "xxRefused",
            "deletes",
            "invalidated",
            "errors",
        )
    } == {
        "hits": 2,
        "misses": 1,
        "sets": 4,
        "nxRefused": 1,
        "xxRefused": 1,
        "deletes": 1,
        "invalidated": 1,
        "errors": 0,
    }
    assert doc["hitRatio"] == round(2 / 3, 4)
    assert doc["latency"]["count"] == 11
    assert doc["latency"]["buckets"]["+Inf"] == 11
    assert "s" in await ask(cache, CacheStatsQuery())


async def test_concurrent_asks_are_batched_into_pipelines(cache: Cache) -> None:
    await asyncio.gather(*(ask(cache, CacheSet("b", f"k{i}", i)) for i in range(500)))
    got = await asyncio.gather(*(ask(cache, CacheGet("b", f"k{i}")) for i in range(500)))
    assert got == [(True, i) for i in range(500)]
    doc = (await ask(cache, CacheStatsQuery("b")))["b"]
    assert doc["sets"] == 500
    assert doc["hits"] == 500


async def test_a_full_mailbox_rejects_instead_of_growing(redis_url: str, redis_prefix: str) -> None:
    small = Cache(
        RedisSettings(prefix=redis_prefix),
        CacheSettings(),
        redis_url,
        mailbox_size=4,
        concurrency=1,
    )
    await small.start()
    try:
        asks = [asyncio.ensure_future(small.ask_nowait(CacheGet("ns", f"k{i}"))) for i in range(40)]
        results = await asyncio.gather(*asks, return_exceptions=True)
        assert any(isinstance(r, MailboxFull) for r in results)
        assert all(r == (False, None) or isinstance(r, MailboxFull) for r in results)
    finally:
        await small.stop()


async def test_a_restarted_redis_means_misses_then_recovery_without_restarting_the_actor(
    state_dir: Path,
) -> None:
    vk = EmbeddedValkey(state_dir, run_as=RunAs.resolve(EMBEDDED_ACCOUNT))
    await vk.start()
    cache = Cache(
        RedisSettings(prefix="jt:", connect_timeout=0.5),
        CacheSettings(),
        vk.url,
        health_interval=0.1,
    )
    await cache.start()
    try:
        await ask(cache, CacheSet("ns", "k", "v"))
        assert vk.proc is not None
        os.kill(vk.proc.pid, signal.SIGTERM)
        await vk.proc.wait()
        assert await ask(cache, CacheGet("ns", "k")) == (False, None)  # a read fails open
        assert await ask(cache, CacheGet("ns", "j")) == (False, None)
        with pytest.raises(CacheUnavailable, match="unreachable"):
            await ask(cache, CacheSet("ns", "k2", "v"))
        with pytest.raises(CacheUnavailable):
            await ask(cache, CacheInvalidatePattern("ns", "*"))
        stats = (await ask(cache, CacheStatsQuery("ns")))["ns"]
        assert stats["errors"] >= 4
        assert stats["misses"] == 2
        vk._state = vk.state.RESTARTING
        await vk.start()
        assert await ask(cache, CacheGet("ns", "k")) == (True, "v")  # the AOF kept it
        assert await ask(cache, CacheSet("ns", "k2", "v"))
        assert cache.stats.crashes == 0
    finally:
        await cache.stop()
        await vk.stop()
