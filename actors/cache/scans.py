"""What loops over many keys — tag invalidation, pattern invalidation, flush —
in a lane of the cache actor's own (``scans``): however long one takes, the
gets and sets queued behind it are not held up.

Nothing outside the namespace's keys and tag sets is ever removed: a tag's
members are checked against the namespace's prefix, and a pattern is
matched after the namespace's literal (escaped) prefix. SCAN + UNLINK in
batches, on every primary of a cluster; never KEYS.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any, Protocol

from actors.cache.messages import (
    CacheError,
    CacheFlush,
    CacheInvalidatePattern,
    CacheInvalidateTags,
    check_key,
    check_namespace,
)
from actors.cache.stats import StatsTable
from actors.kernel import Room
from actors.redis_link import REDIS_FAILURES, RedisClient, RedisUnavailable

__all__ = ["SCAN_BATCH", "glob_escape", "scans"]

SCAN_BATCH = 1000
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


class CacheStore(Protocol):
    """The cache actor as this room sees it."""

    cluster: bool
    ns_stats: StatsTable
    invalidate_tag: Any  # the INVALIDATE_TAG script

    def redis(self) -> RedisClient: ...

    def key(self, ns: str, key: str) -> str: ...

    def tag_key(self, ns: str, tag: str) -> str: ...

    def down(self, exc: BaseException) -> RedisUnavailable: ...


scans: Room[CacheStore] = Room("scans", lane="scans")


def glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)


@scans.handles(CacheInvalidateTags)
async def invalidate_tags(cache: CacheStore, msg: CacheInvalidateTags) -> int:
    ns = msg.namespace
    check_namespace(ns)
    if not msg.tags:
        raise CacheError("give at least one tag")
    for tag in msg.tags:
        check_key(tag, "tag")
    removed = 0
    started = time.perf_counter()
    try:
        for tag in msg.tags:  # atomic per tag (on a cluster: per batch of members)
            if cache.cluster:
                removed += await _pop_tag(cache, cache.tag_key(ns, tag), cache.key(ns, ""))
                continue
            removed += int(
                await cache.invalidate_tag(keys=[cache.tag_key(ns, tag)], args=[cache.key(ns, "")])
            )
    except REDIS_FAILURES as exc:
        cache.ns_stats.of(ns).errors += 1
        raise cache.down(exc) from exc
    stats = cache.ns_stats.of(ns)
    stats.invalidated += removed
    stats.observe(time.perf_counter() - started)
    return removed


@scans.handles(CacheInvalidatePattern)
async def invalidate_pattern(cache: CacheStore, msg: CacheInvalidatePattern) -> int:
    ns = msg.namespace
    check_namespace(ns)
    check_key(msg.pattern, "pattern")
    # The caller's glob goes after the namespace's literal (escaped) prefix.
    return await _unlink_matching(cache, ns, glob_escape(cache.key(ns, "")) + msg.pattern)


@scans.handles(CacheFlush)
async def flush(cache: CacheStore, msg: CacheFlush) -> int:
    ns = msg.namespace
    check_namespace(ns)
    removed = await _unlink_matching(cache, ns, glob_escape(cache.key(ns, "")) + "*")
    await _unlink_matching(
        cache, ns, glob_escape(cache.tag_key(ns, "")) + "*", count_as_invalidated=False
    )
    return removed


async def _pop_tag(cache: CacheStore, tag_key: str, prefix: str) -> int:
    """A tag's members live in many slots: take them out of the set in
    batches (SPOP: a key tagged meanwhile is either taken or stays for the
    next invalidation) and remove each batch, node by node. A batch that
    could not be removed is put back (if Redis lets us)."""
    client = cache.redis()
    own = prefix.encode()
    removed = 0
    while True:
        members: Any = await client.spop(tag_key, SCAN_BATCH)
        if not members:
            return removed
        keys = [m for m in members if isinstance(m, bytes) and m.startswith(own)]
        if not keys:
            continue
        try:
            removed += await _unlink_keys(cache, keys)
        except REDIS_FAILURES:
            # Not removed: back into the set for the next invalidation.
            with contextlib.suppress(*REDIS_FAILURES):
                await client.sadd(tag_key, *keys)
            raise


async def _unlink_keys(cache: CacheStore, keys: list[Any]) -> int:
    client = cache.redis()
    if not cache.cluster:
        return int(await client.unlink(*keys))
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.execute_command("UNLINK", key)
        return sum(int(n) for n in await pipe.execute())


async def _unlink_matching(
    cache: CacheStore, ns: str, pattern: str, *, count_as_invalidated: bool = True
) -> int:
    """SCAN (every primary of a cluster) + UNLINK in batches."""
    client = cache.redis()
    removed = 0
    started = time.perf_counter()
    try:
        batch: list[Any] = []
        async for key in client.scan_iter(match=pattern, count=SCAN_BATCH):
            batch.append(key)
            if len(batch) >= SCAN_BATCH:
                removed += await _unlink_keys(cache, batch)
                batch = []
        if batch:
            removed += await _unlink_keys(cache, batch)
    except REDIS_FAILURES as exc:
        cache.ns_stats.of(ns).errors += 1
        raise cache.down(exc) from exc
    stats = cache.ns_stats.of(ns)
    if count_as_invalidated:
        stats.invalidated += removed
    stats.observe(time.perf_counter() - started)
    return removed
