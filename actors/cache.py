"""The cache actor: TTL, NX/XX, tags, patterns, stats on Redis (DESIGN §7).

Keys: ``{prefix}cache:{namespace}:{key}``; tag sets: ``{prefix}cache-tag:{namespace}:{tag}``.
Nothing outside ``{prefix}cache:`` / ``{prefix}cache-tag:`` is ever touched,
by flush and pattern invalidation included.

Throughput: each worker takes every message waiting in the mailbox (up to
``batch_max``) and sends them as one pipeline: one round trip for many asks.
Values are JSON (msgspec) unless given as bytes, which pass through raw.

Failure policy: when Redis is unreachable, reads are misses (counted as
misses and errors) and writes raise CacheUnavailable (HTTP 503); redis-py
reconnects by itself on the next command.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import msgspec
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from actors.kernel import handles
from actors.redis_link import REDIS_FAILURES, RedisClientActor, RedisUnavailable
from config import CacheSettings, RedisSettings

__all__ = [
    "Cache",
    "CacheDelete",
    "CacheError",
    "CacheExists",
    "CacheFlush",
    "CacheGet",
    "CacheInvalidatePattern",
    "CacheInvalidateTags",
    "CacheMGet",
    "CacheMSet",
    "CacheSet",
    "CacheStatsQuery",
    "CacheTtl",
    "CacheUnavailable",
    "clamp_ttl_ms",
]

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_KEY_BYTES = 4096
MAX_TAGS = 64
SCAN_BATCH = 1000
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
Mode = Literal["", "NX", "XX"]
# The statistics entry shared by namespaces past cache.max_namespaces; not a
# valid namespace name, so no client can write under it.
OTHER_NAMESPACES = "(other)"


# Refusals that say "not now" (a cluster failing over or resharding, a
# replica answering): the write could not happen, so 503, not the caller's error.
_NOT_NOW = (AskError, ClusterDownError, ReadOnlyError, TryAgainError)


class CacheError(ValueError):
    """Invalid cache input (namespace, key, TTL, tags): nothing was changed."""


class CacheUnavailable(RedisUnavailable):
    """Redis cannot be reached; the write did not happen."""


# -- messages ---------------------------------------------------------------------
class CacheGet(msgspec.Struct, frozen=True):
    """Replies (hit, value); a cached null is a hit."""

    namespace: str
    key: str
    raw: bool = False


class CacheSet(msgspec.Struct, frozen=True):
    """Replies True if stored, False if NX/XX refused it."""

    namespace: str
    key: str
    value: Any
    ttl_ms: int | None = None  # None: cache.default_ttl (unless keepttl)
    mode: Mode = ""
    keepttl: bool = False
    tags: tuple[str, ...] = ()


class CacheDelete(msgspec.Struct, frozen=True):
    namespace: str
    keys: tuple[str, ...]


class CacheExists(msgspec.Struct, frozen=True):
    namespace: str
    keys: tuple[str, ...]


class CacheTtl(msgspec.Struct, frozen=True):
    """Replies the remaining TTL in ms, -1 without expiry, -2 when missing."""

    namespace: str
    key: str


class CacheMGet(msgspec.Struct, frozen=True):
    namespace: str
    keys: tuple[str, ...]
    raw: bool = False


class CacheMSet(msgspec.Struct, frozen=True):
    namespace: str
    items: dict[str, Any]
    ttl_ms: int | None = None


class CacheInvalidateTags(msgspec.Struct, frozen=True):
    """Replies the number of keys removed."""

    namespace: str
    tags: tuple[str, ...]


class CacheInvalidatePattern(msgspec.Struct, frozen=True):
    """Glob over keys of the namespace; replies the number of keys removed."""

    namespace: str
    pattern: str


class CacheFlush(msgspec.Struct, frozen=True):
    """Remove every key and tag set of the namespace, and only those."""

    namespace: str


class CacheStatsQuery(msgspec.Struct, frozen=True):
    """Replies {namespace: statistics}; with ``total``, {"all": the sum}:
    namespace names are the clients', so public routes see only the sum."""

    namespace: str | None = None
    total: bool = False


# -- stats -------------------------------------------------------------------------
@dataclass
class NamespaceStats:
    hits: int = 0
    misses: int = 0
    sets: int = 0
    nx_refused: int = 0
    xx_refused: int = 0
    deletes: int = 0
    invalidated: int = 0
    errors: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    latency_count: int = 0

    def observe(self, seconds: float) -> None:
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def add(self, other: NamespaceStats) -> None:
        for name in (
            "hits",
            "misses",
            "sets",
            "nx_refused",
            "xx_refused",
            "deletes",
            "invalidated",
            "errors",
            "latency_sum",
            "latency_count",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency_buckets = [
            a + b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)
        ]

    def document(self) -> dict[str, Any]:
        reads = self.hits + self.misses
        cumulative, buckets = 0, {}
        for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), self.latency_buckets, strict=True):
            cumulative += count
            buckets[str(bound)] = cumulative
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hitRatio": round(self.hits / reads, 4) if reads else None,
            "sets": self.sets,
            "nxRefused": self.nx_refused,
            "xxRefused": self.xx_refused,
            "deletes": self.deletes,
            "invalidated": self.invalidated,
            "errors": self.errors,
            "latency": {
                "count": self.latency_count,
                "sumSeconds": round(self.latency_sum, 6),
                "buckets": buckets,
            },
        }


# -- Lua ----------------------------------------------------------------------------
# Each tag set lives at least as long as its longest-lived key (never shortened
# to the last key's TTL); a key without a TTL makes its tag sets persistent.
ADD_TAG = """
local function add_tag(tag, member, key_ttl)
  local existed = redis.call('EXISTS', tag)
  redis.call('SADD', tag, member)
  local cur = redis.call('PTTL', tag)
  if key_ttl < 0 then
    if existed == 1 and cur >= 0 then redis.call('PERSIST', tag) end
  elseif existed == 0 or (cur >= 0 and cur < key_ttl) then
    redis.call('PEXPIRE', tag, key_ttl)
  end
end
"""

# KEYS[1] = key, KEYS[2..] = tag sets. ARGV: value, ttl_ms (0 = none), mode, keepttl,
# default ttl_ms (for a key KEEPTTL finds without one).
# Value, mode, TTL and tag membership in one atomic step. Replies the key's TTL
# in ms (-1: none), or nil when NX/XX refused the write.
TAGGED_SET = (
    ADD_TAG
    + """
local args = {KEYS[1], ARGV[1]}
local ttl = tonumber(ARGV[2])
if ARGV[4] == '1' then table.insert(args, 'KEEPTTL') elseif ttl > 0 then
  table.insert(args, 'PX'); table.insert(args, ttl) end
if ARGV[3] ~= '' then table.insert(args, ARGV[3]) end
if not redis.call('SET', unpack(args)) then return nil end
local key_ttl = redis.call('PTTL', KEYS[1])
if key_ttl == -1 and ARGV[4] == '1' then
  -- KEEPTTL on a key that had none (a new key): it gets the default TTL.
  redis.call('PEXPIRE', KEYS[1], ARGV[5]); key_ttl = tonumber(ARGV[5])
end
for i = 2, #KEYS do add_tag(KEYS[i], KEYS[1], key_ttl) end
return key_ttl
"""
)

# On a cluster, a key and its tag sets sit in different slots: after the key's
# own TAGGED_SET, each tag set gets it here. KEYS[1] = tag set. ARGV: key, its TTL.
TAG_ADD = ADD_TAG + "add_tag(KEYS[1], ARGV[1], tonumber(ARGV[2]))\nreturn 1\n"

# KEYS[1] = tag set. ARGV[1] = the namespace's key prefix: members outside it are
# never deleted. Replies how many member keys were still present and removed.
INVALIDATE_TAG = """
local members = redis.call('SMEMBERS', KEYS[1])
local removed, batch = 0, {}
local plen = string.len(ARGV[1])
for _, m in ipairs(members) do
  if string.sub(m, 1, plen) == ARGV[1] then
    table.insert(batch, m)
    if #batch == 1000 then removed = removed + redis.call('UNLINK', unpack(batch)); batch = {} end
  end
end
if #batch > 0 then removed = removed + redis.call('UNLINK', unpack(batch)) end
redis.call('UNLINK', KEYS[1])
return removed
"""

_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


def glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def clamp_ttl_ms(settings: CacheSettings, ttl_ms: int | None) -> int:
    """The TTL a set gets: the default when none is asked, at most cache.max_ttl."""
    ttl = settings.default_ttl * 1000 if ttl_ms is None else ttl_ms
    if ttl <= 0:
        raise CacheError("ttl must be positive")
    return min(ttl, settings.max_ttl * 1000)


def _check_namespace(ns: str) -> None:
    if not NAMESPACE_RE.match(ns):
        raise CacheError(f"namespace {ns!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")


def _check_key(key: str, what: str = "key") -> None:
    if not key:
        raise CacheError(f"{what} must not be empty")
    # At most 4 bytes a character: short keys need no encoding to be counted.
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode()) > MAX_KEY_BYTES:
        raise CacheError(f"{what} is longer than {MAX_KEY_BYTES} bytes")


class Cache(RedisClientActor):
    batch_max: ClassVar[int] = 256
    client_name: ClassVar[str] = "jarvisd-cache"
    unavailable: ClassVar[type[RedisUnavailable]] = CacheUnavailable

    def __init__(
        self,
        redis_settings: RedisSettings,
        cache_settings: CacheSettings,
        url: str,
        *,
        name: str = "cache",
        concurrency: int = 2,
        mailbox_size: int = 10_000,
        health_interval: float = 2.0,
    ) -> None:
        super().__init__(
            name,
            redis_settings,
            url,
            mailbox_size=mailbox_size,
            concurrency=concurrency,
            health_interval=health_interval,
        )
        self.cache_settings = cache_settings
        self.stats_by_ns: dict[str, NamespaceStats] = {}
        self._tagged_set: Any = None
        self._tag_add: Any = None
        self._invalidate_tag: Any = None
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder()

    # -- keys ------------------------------------------------------------------------
    def key(self, ns: str, key: str) -> str:
        return f"{self.redis_settings.prefix}cache:{ns}:{key}"

    def tag_key(self, ns: str, tag: str) -> str:
        return f"{self.redis_settings.prefix}cache-tag:{ns}:{tag}"

    def _stats(self, ns: str) -> NamespaceStats:
        """The namespace's counters. Namespaces are client-chosen names: past
        ``cache.max_namespaces`` new ones share one entry, so memory, /stats and
        /metrics stay bounded whatever names clients send."""
        stats = self.stats_by_ns.get(ns)
        if stats is None:
            if len(self.stats_by_ns) >= self.cache_settings.max_namespaces:
                ns = OTHER_NAMESPACES
                stats = self.stats_by_ns.get(ns)
            if stats is None:
                stats = self.stats_by_ns[ns] = NamespaceStats()
        return stats

    # -- lifecycle -------------------------------------------------------------------
    async def on_start(self) -> None:
        # Each pipeline in flight takes its own connection from the client's pool.
        await super().on_start()
        client = self._client()
        self._tagged_set = client.register_script(TAGGED_SET)
        self._tag_add = client.register_script(TAG_ADD)
        self._invalidate_tag = client.register_script(INVALIDATE_TAG)

    # -- encoding ----------------------------------------------------------------------
    def _encode(self, value: Any) -> bytes:
        data = (
            bytes(value)
            if isinstance(value, bytes | bytearray | memoryview)
            else self._encoder.encode(value)
        )
        limit = self.cache_settings.max_value_bytes
        if len(data) > limit:
            raise CacheError(f"value of {len(data)} bytes is over the limit of {limit} bytes")
        return data

    def _decode(self, data: bytes | None, raw: bool) -> Any:
        if data is None or raw:
            return data
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError:
            return data  # written raw by someone else: hand it back as bytes

    def _ttl_ms(self, msg: CacheSet | CacheMSet) -> int:
        if isinstance(msg, CacheSet) and msg.keepttl:
            if msg.ttl_ms is not None:
                raise CacheError("keepttl and a TTL exclude each other")
            return 0
        return clamp_ttl_ms(self.cache_settings, msg.ttl_ms)

    # -- the pipelined path --------------------------------------------------------------
    async def handle_batch(self, msgs: list[Any]) -> list[Any]:
        """Simple operations go out as one pipeline; scans and tag
        invalidations (which loop or take their time) run one by one after."""
        results: list[Any] = [None] * len(msgs)
        plans: list[tuple[int, int, Callable[[list[Any]], Any]]] = []
        client = self._client()
        pipe = client.pipeline(transaction=False)
        # Plain reads of the batch go as one MGET: one command, one reply.
        # (On a cluster the keys sit in many slots: each read is a GET of its own.)
        many = len(msgs) > 1 and not self.cluster
        reads = [i for i, m in enumerate(msgs) if type(m) is CacheGet] if many else []
        if len(reads) > 1:
            plans.append((-1, 0, self._queue_reads(pipe, msgs, reads, results)))
        else:
            reads = []
        batched = set(reads)
        n_cmds = len(pipe)
        slow: list[int] = []
        for i, msg in enumerate(msgs):
            if i in batched:
                continue
            try:
                before = n_cmds
                decode = await self._queue(pipe, msg)
                if decode is None:
                    slow.append(i)
                    continue
                n_cmds = len(pipe)
                plans.append((i, before, decode))
            except CacheError as exc:
                results[i] = exc
        if plans:
            await self._run_pipeline(pipe, msgs, plans, results)
        for i in slow:
            try:
                results[i] = await self._slow(msgs[i])
            except (CacheError, CacheUnavailable) as exc:
                results[i] = exc
        return results

    async def _run_pipeline(
        self,
        pipe: Any,
        msgs: list[Any],
        plans: list[tuple[int, int, Callable[[list[Any]], Any]]],
        results: list[Any],
    ) -> None:
        started = time.perf_counter()
        try:
            replies = await pipe.execute(raise_on_error=False)
        except REDIS_FAILURES as exc:
            for i, _start, decode in plans:
                if i < 0:
                    decode([exc])
                else:
                    results[i] = self._unavailable(msgs[i], exc)
            return
        elapsed = time.perf_counter() - started
        bounds = [start for _i, start, _d in plans] + [len(replies)]
        for (i, start, decode), end in zip(plans, bounds[1:], strict=True):
            own = replies[start:end]
            if i < 0:  # the batch's MGET: its decode sets each read's result
                decode(own)
                continue
            stats = self._stats(msgs[i].namespace)
            stats.observe(elapsed)
            error = next((r for r in own if isinstance(r, Exception)), None)
            if error is not None:
                results[i] = self._unavailable(msgs[i], error)
                continue
            results[i] = decode(own)

    def _queue_reads(
        self, pipe: Any, msgs: list[Any], reads: list[int], results: list[Any]
    ) -> Callable[[list[Any]], Any]:
        """One MGET for the batch's reads; bad ones answer their error at once."""
        valid: list[int] = []
        for i in reads:
            try:
                _check_namespace(msgs[i].namespace)
                _check_key(msgs[i].key)
                valid.append(i)
            except CacheError as exc:
                results[i] = exc
        if not valid:
            pipe.echo(b"")  # keeps the plan's reply slot
        else:
            pipe.mget([self.key(msgs[i].namespace, msgs[i].key) for i in valid])
        started = time.perf_counter()

        def got(r: list[Any]) -> None:
            elapsed = time.perf_counter() - started
            error = r[0] if isinstance(r[0], Exception) else None
            for n, i in enumerate(valid):
                msg = msgs[i]
                stats = self._stats(msg.namespace)
                stats.observe(elapsed)
                if error is not None:
                    results[i] = self._unavailable(msg, error)
                elif r[0][n] is None:
                    stats.misses += 1
                    results[i] = (False, None)
                else:
                    stats.hits += 1
                    results[i] = (True, self._decode(r[0][n], msg.raw))

        return got

    def _unavailable(self, msg: Any, exc: BaseException) -> Any:
        """A read that could not be served is a miss; a write is an error."""
        stats = self._stats(msg.namespace)
        stats.errors += 1
        if isinstance(msg, CacheGet):
            stats.misses += 1
            return (False, None)
        if isinstance(msg, CacheMGet):
            stats.misses += len(msg.keys)
            return [(False, None)] * len(msg.keys)
        if isinstance(msg, CacheExists):
            return 0
        if isinstance(exc, ResponseError) and not isinstance(exc, _NOT_NOW):
            return CacheError(f"redis refused the command: {exc}")
        return self._down(exc)

    async def _queue(self, pipe: Any, msg: Any) -> Callable[[list[Any]], Any] | None:
        """Add msg's commands to the pipeline; return how to build its reply, or
        None when it must run on its own."""
        if isinstance(msg, CacheStatsQuery):
            return None
        ns = msg.namespace
        _check_namespace(ns)
        stats = self._stats(ns)
        if isinstance(msg, CacheGet):
            _check_key(msg.key)
            pipe.get(self.key(ns, msg.key))

            def got(r: list[Any]) -> Any:
                if r[0] is None:
                    stats.misses += 1
                    return (False, None)
                stats.hits += 1
                return (True, self._decode(r[0], msg.raw))

            return got
        if isinstance(msg, CacheSet):
            return await self._queue_set(pipe, msg, stats)
        if isinstance(msg, CacheDelete):
            for k in msg.keys:
                _check_key(k)
            self._queue_per_slot(pipe, "UNLINK", [self.key(ns, k) for k in msg.keys])

            def deleted(r: list[Any]) -> int:
                stats.deletes += sum(int(n) for n in r)
                return sum(int(n) for n in r)

            return deleted
        if isinstance(msg, CacheExists):
            for k in msg.keys:
                _check_key(k)
            self._queue_per_slot(pipe, "EXISTS", [self.key(ns, k) for k in msg.keys])
            return lambda r: sum(int(n) for n in r)
        if isinstance(msg, CacheTtl):
            _check_key(msg.key)
            pipe.pttl(self.key(ns, msg.key))
            return lambda r: int(r[0])
        if isinstance(msg, CacheMGet):
            for k in msg.keys:
                _check_key(k)
            if self.cluster:
                for k in msg.keys:
                    pipe.get(self.key(ns, k))
            else:
                pipe.mget([self.key(ns, k) for k in msg.keys])

            def mgot(r: list[Any]) -> list[tuple[bool, Any]]:
                out = []
                for data in r if self.cluster else r[0]:
                    if data is None:
                        stats.misses += 1
                        out.append((False, None))
                    else:
                        stats.hits += 1
                        out.append((True, self._decode(data, msg.raw)))
                return out

            return mgot
        if isinstance(msg, CacheMSet):
            ttl = self._ttl_ms(msg)
            encoded = {}
            for k, v in msg.items.items():
                _check_key(k)
                encoded[self.key(ns, k)] = self._encode(v)
            for k, data in encoded.items():
                pipe.set(k, data, px=ttl)

            def msetted(_r: list[Any]) -> bool:
                stats.sets += len(encoded)
                return True

            return msetted
        return None

    def _queue_per_slot(self, pipe: Any, command: str, keys: list[str]) -> None:
        """A multi-key command: one command on one server, one per key on a
        cluster (the pipeline sends each to its slot's node)."""
        if self.cluster:
            for key in keys:
                pipe.execute_command(command, key)
        else:
            pipe.execute_command(command, *keys)

    async def _queue_set(
        self, pipe: Any, msg: CacheSet, stats: NamespaceStats
    ) -> Callable[[list[Any]], Any] | None:
        _check_key(msg.key)
        if len(msg.tags) > MAX_TAGS:
            raise CacheError(f"at most {MAX_TAGS} tags per key")
        for tag in msg.tags:
            _check_key(tag, "tag")
        ttl = self._ttl_ms(msg)
        data = self._encode(msg.value)
        key = self.key(msg.namespace, msg.key)
        if self.cluster and (msg.tags or msg.keepttl):
            return None  # the key and its tag sets are in different slots: _cluster_set
        if msg.tags or msg.keepttl:
            await self._tagged_set(
                keys=[key, *(self.tag_key(msg.namespace, t) for t in msg.tags)],
                args=[
                    data,
                    ttl,
                    msg.mode,
                    "1" if msg.keepttl else "0",
                    clamp_ttl_ms(self.cache_settings, None),
                ],
                client=pipe,
            )
        else:
            pipe.set(
                key,
                data,
                px=ttl or None,
                nx=msg.mode == "NX",
                xx=msg.mode == "XX",
                keepttl=msg.keepttl,
            )

        return lambda r: self._count_set(msg, stats, r[-1] is not None)

    @staticmethod
    def _count_set(msg: CacheSet, stats: NamespaceStats, ok: bool) -> bool:
        if ok:
            stats.sets += 1
        elif msg.mode == "NX":
            stats.nx_refused += 1
        else:
            stats.xx_refused += 1
        return ok

    async def _cluster_set(self, msg: CacheSet) -> bool:
        """A tagged (or KEEPTTL) set on a cluster: the key first (atomic with its
        mode and TTL), then each tag set in its own slot. In this order an
        invalidation running meanwhile cannot lose the key: either it finds the
        key in the tag set, or the key joins the set after it and the next
        invalidation finds it. Should Redis fail between the two steps, the
        write answers 503 and the key is removed again if Redis lets us."""
        ns = msg.namespace
        stats = self._stats(ns)
        key = self.key(ns, msg.key)
        started = time.perf_counter()
        try:
            key_ttl = await self._tagged_set(
                keys=[key],
                args=[
                    self._encode(msg.value),
                    self._ttl_ms(msg),
                    msg.mode,
                    "1" if msg.keepttl else "0",
                    clamp_ttl_ms(self.cache_settings, None),
                ],
            )
            if key_ttl is not None and msg.tags:
                try:
                    await asyncio.gather(
                        *(
                            self._tag_add(keys=[self.tag_key(ns, t)], args=[key, key_ttl])
                            for t in msg.tags
                        )
                    )
                except REDIS_FAILURES:
                    with contextlib.suppress(*REDIS_FAILURES):
                        await self._client().unlink(key)
                    raise
        except REDIS_FAILURES as exc:
            stats.errors += 1
            raise self._down(exc) from exc
        stats.observe(time.perf_counter() - started)
        return self._count_set(msg, stats, key_ttl is not None)

    # -- operations that loop ------------------------------------------------------------
    async def _slow(self, msg: Any) -> Any:
        if isinstance(msg, CacheStatsQuery):
            return self.stats_document(msg.namespace, total=msg.total)
        ns = msg.namespace
        _check_namespace(ns)
        if isinstance(msg, CacheSet):
            return await self._cluster_set(msg)
        if isinstance(msg, CacheInvalidateTags):
            return await self._invalidate_tags(ns, msg.tags)
        if isinstance(msg, CacheInvalidatePattern):
            _check_key(msg.pattern, "pattern")
            return await self._unlink_matching(
                ns, self.key(ns, "") + msg.pattern, prefix_literal=self.key(ns, "")
            )
        if isinstance(msg, CacheFlush):
            removed = await self._unlink_matching(
                ns, glob_escape(self.key(ns, "")) + "*", count_as_invalidated=True
            )
            await self._unlink_matching(
                ns, glob_escape(self.tag_key(ns, "")) + "*", count_as_invalidated=False
            )
            return removed
        raise CacheError(f"unsupported cache message {type(msg).__name__}")

    async def _invalidate_tags(self, ns: str, tags: tuple[str, ...]) -> int:
        if not tags:
            raise CacheError("give at least one tag")
        for tag in tags:
            _check_key(tag, "tag")
        removed = 0
        started = time.perf_counter()
        try:
            for tag in tags:  # atomic per tag (on a cluster: per batch of members)
                if self.cluster:
                    removed += await self._pop_tag(self.tag_key(ns, tag), self.key(ns, ""))
                    continue
                removed += int(
                    await self._invalidate_tag(
                        keys=[self.tag_key(ns, tag)], args=[self.key(ns, "")]
                    )
                )
        except REDIS_FAILURES as exc:
            self._stats(ns).errors += 1
            raise self._down(exc) from exc
        stats = self._stats(ns)
        stats.invalidated += removed
        stats.observe(time.perf_counter() - started)
        return removed

    async def _pop_tag(self, tag_key: str, prefix: str) -> int:
        """A tag's members live in many slots: take them out of the set in
        batches (SPOP: a key tagged meanwhile is either taken or stays for the
        next invalidation) and remove each batch, node by node. A batch that
        could not be removed is put back (if Redis lets us)."""
        client = self._client()
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
                removed += await self._unlink_keys(keys)
            except REDIS_FAILURES:
                # Not removed: back into the set for the next invalidation.
                with contextlib.suppress(*REDIS_FAILURES):
                    await client.sadd(tag_key, *keys)
                raise

    async def _unlink_keys(self, keys: list[Any]) -> int:
        client = self._client()
        if not self.cluster:
            return int(await client.unlink(*keys))
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.execute_command("UNLINK", key)
            return sum(int(n) for n in await pipe.execute())

    async def _unlink_matching(
        self,
        ns: str,
        pattern: str,
        *,
        prefix_literal: str | None = None,
        count_as_invalidated: bool = True,
    ) -> int:
        """SCAN (every primary of a cluster) + UNLINK in batches. Never KEYS."""
        if prefix_literal is not None:
            # The caller's glob goes after the namespace's literal (escaped) prefix.
            pattern = glob_escape(prefix_literal) + pattern[len(prefix_literal) :]
        client = self._client()
        removed = 0
        started = time.perf_counter()
        try:
            batch: list[Any] = []
            async for key in client.scan_iter(match=pattern, count=SCAN_BATCH):
                batch.append(key)
                if len(batch) >= SCAN_BATCH:
                    removed += await self._unlink_keys(batch)
                    batch = []
            if batch:
                removed += await self._unlink_keys(batch)
        except REDIS_FAILURES as exc:
            self._stats(ns).errors += 1
            raise self._down(exc) from exc
        stats = self._stats(ns)
        if count_as_invalidated:
            stats.invalidated += removed
        stats.observe(time.perf_counter() - started)
        return removed

    def stats_document(self, ns: str | None = None, *, total: bool = False) -> dict[str, Any]:
        if total:
            summed = NamespaceStats()
            for one in self.stats_by_ns.values():
                summed.add(one)
            return {"all": summed.document()}
        if ns is not None:
            _check_namespace(ns)
            found = self.stats_by_ns.get(ns)
            return {ns: (found or NamespaceStats()).document()}
        return {name: s.document() for name, s in sorted(self.stats_by_ns.items())}

    # -- single messages (tell/ask outside a batch) -----------------------------------------
    @handles(
        CacheGet,
        CacheSet,
        CacheDelete,
        CacheExists,
        CacheTtl,
        CacheMGet,
        CacheMSet,
        CacheInvalidateTags,
        CacheInvalidatePattern,
        CacheFlush,
        CacheStatsQuery,
    )
    async def _one(self, msg: Any) -> Any:
        (result,) = await self.handle_batch([msg])
        if isinstance(result, Exception):
            raise result
        return result
