"""The cache actor: TTL, NX/XX, tags, patterns, stats on Redis (DESIGN §7).

Nothing outside ``{prefix}cache:`` / ``{prefix}cache-tag:`` is ever touched,
by flush and pattern invalidation included.

Two lanes, so that fast operations never wait behind slow ones:
- the main mailbox takes gets, sets, deletes and exists checks: each worker
  takes every one waiting (up to ``batch_max``) and sends them as one
  pipeline, one round trip for many asks (a tagged set on a cluster, which
  spans slots, runs beside the pipeline, not after it);
- the ``scans`` lane (``scans``) takes tag and pattern invalidations and
  flushes, which loop over many keys, with workers of its own.

Failure policy: when Redis is unreachable, reads are misses (counted as
misses and errors) and writes raise CacheUnavailable (HTTP 503); redis-py
reconnects by itself on the next command.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec
from redis.exceptions import AskError, ClusterDownError, ReadOnlyError, ResponseError, TryAgainError

from actors.cache.messages import (
    MAX_TAGS,
    CacheDelete,
    CacheError,
    CacheExists,
    CacheGet,
    CacheSet,
    CacheStatsQuery,
    CacheUnavailable,
    check_key,
    check_namespace,
    clamp_ttl_ms,
)
from actors.cache.scans import scans
from actors.cache.scripts import INVALIDATE_TAG, TAG_ADD, TAGGED_SET
from actors.cache.stats import NamespaceStats, StatsTable
from actors.kernel import LaneSpec, handles
from actors.redis_link import REDIS_FAILURES, RedisClient, RedisClientActor, RedisUnavailable
from config import CacheSettings, RedisSettings

__all__ = ["Cache"]

# Refusals that say "not now" (a cluster failing over or resharding, a
# replica answering): the write could not happen, so 503, not the caller's error.
_NOT_NOW = (AskError, ClusterDownError, ReadOnlyError, TryAgainError)
# One message's part of a pipeline: (its index in the batch, or -1 for the
# batch's MGET; its first command; how to make its reply from its replies).
Plan = tuple[int, int, Callable[[list[Any]], Any]]


class Cache(RedisClientActor):
    batched: ClassVar[tuple[type, ...]] = (CacheGet, CacheSet, CacheDelete, CacheExists)
    batch_max: ClassVar[int] = 256
    rooms = (scans,)
    lanes: ClassVar[dict[str, LaneSpec]] = {"scans": LaneSpec(mailbox_size=1000, concurrency=2)}
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
        self.ns_stats = StatsTable(lambda: self.cache_settings.max_namespaces)
        self.invalidate_tag: Any = None
        self._tagged_set: Any = None
        self._tag_add: Any = None
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder()

    # -- what the scans room uses -----------------------------------------------------------
    def key(self, ns: str, key: str) -> str:
        return f"{self.redis_settings.prefix}cache:{ns}:{key}"

    def tag_key(self, ns: str, tag: str) -> str:
        return f"{self.redis_settings.prefix}cache-tag:{ns}:{tag}"

    def redis(self) -> RedisClient:
        return self._client()

    def down(self, exc: BaseException) -> RedisUnavailable:
        return self._down(exc)

    # -- lifecycle -------------------------------------------------------------------
    async def on_start(self) -> None:
        # Each pipeline in flight takes its own connection from the client's pool.
        await super().on_start()
        client = self._client()
        self._tagged_set = client.register_script(TAGGED_SET)
        self._tag_add = client.register_script(TAG_ADD)
        self.invalidate_tag = client.register_script(INVALIDATE_TAG)

    @handles(CacheStatsQuery)
    async def _stats_query(self, msg: CacheStatsQuery) -> dict[str, Any]:
        if msg.namespace is not None:
            check_namespace(msg.namespace)
        return self.ns_stats.document(msg.namespace, total=msg.total)

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

    def _ttl_ms(self, msg: CacheSet) -> int:
        if msg.keepttl:
            if msg.ttl_ms is not None:
                raise CacheError("keepttl and a TTL exclude each other")
            return 0
        return clamp_ttl_ms(self.cache_settings, msg.ttl_ms)

    # -- the pipelined path --------------------------------------------------------------
    async def handle_batch(self, msgs: list[Any]) -> list[Any]:
        """One pipeline for the batch; tagged sets on a cluster (which span
        slots) run beside it."""
        results: list[Any] = [None] * len(msgs)
        plans: list[Plan] = []
        pipe = self._client().pipeline(transaction=False)
        # Plain reads of the batch go as one MGET: one command, one reply.
        # (On a cluster the keys sit in many slots: each read is a GET of its own.)
        many = len(msgs) > 1 and not self.cluster
        reads = [i for i, m in enumerate(msgs) if type(m) is CacheGet] if many else []
        if len(reads) > 1:
            plans.append((-1, 0, self._queue_reads(pipe, msgs, reads, results)))
        else:
            reads = []
        batched = set(reads)
        apart: list[int] = []
        for i, msg in enumerate(msgs):
            if i in batched:
                continue
            try:
                before = len(pipe)
                decode = await self._queue(pipe, msg)
                if decode is None:
                    apart.append(i)
                    continue
                plans.append((i, before, decode))
            except CacheError as exc:
                results[i] = exc
        work = [self._set_apart(msgs[i], results, i) for i in apart]
        if plans:
            work.append(self._run_pipeline(pipe, msgs, plans, results))
        await asyncio.gather(*work)
        return results

    async def _set_apart(self, msg: CacheSet, results: list[Any], i: int) -> None:
        try:
            results[i] = await self._cluster_set(msg)
        except (CacheError, CacheUnavailable) as exc:
            results[i] = exc

    async def _run_pipeline(
        self, pipe: Any, msgs: list[Any], plans: list[Plan], results: list[Any]
    ) -> None:
        started = time.perf_counter()
        try:
            replies = await pipe.execute(raise_on_error=False)
        except REDIS_FAILURES as exc:
            self._pipeline_failed(msgs, plans, results, exc)
            return
        except (AttributeError, TypeError) as exc:
            if not self.cluster:
                raise
            # redis-py's cluster pipeline can fail this way while a node goes
            # away (the connection is torn down under the write): Redis could
            # not serve the batch, as in any outage.
            self.log.warning("cache_pipeline_broken", error=repr(exc))
            self._pipeline_failed(msgs, plans, results, exc)
            return
        elapsed = time.perf_counter() - started
        bounds = [start for _i, start, _d in plans] + [len(replies)]
        for (i, start, decode), end in zip(plans, bounds[1:], strict=True):
            own = replies[start:end]
            if i < 0:  # the batch's MGET: its decode sets each read's result
                decode(own)
                continue
            self.ns_stats.of(msgs[i].namespace).observe(elapsed)
            error = next((r for r in own if isinstance(r, Exception)), None)
            if error is not None:
                results[i] = self._unavailable(msgs[i], error)
                continue
            results[i] = decode(own)

    def _pipeline_failed(
        self, msgs: list[Any], plans: list[Plan], results: list[Any], exc: BaseException
    ) -> None:
        for i, _start, decode in plans:
            if i < 0:
                decode([exc])
            else:
                results[i] = self._unavailable(msgs[i], exc)

    def _queue_reads(
        self, pipe: Any, msgs: list[Any], reads: list[int], results: list[Any]
    ) -> Callable[[list[Any]], Any]:
        """One MGET for the batch's reads; bad ones answer their error at once."""
        valid: list[int] = []
        for i in reads:
            try:
                check_namespace(msgs[i].namespace)
                check_key(msgs[i].key)
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
                stats = self.ns_stats.of(msg.namespace)
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
        stats = self.ns_stats.of(msg.namespace)
        stats.errors += 1
        if isinstance(msg, CacheGet):
            stats.misses += 1
            return (False, None)
        if isinstance(msg, CacheExists):
            return 0
        if isinstance(exc, ResponseError) and not isinstance(exc, _NOT_NOW):
            return CacheError(f"redis refused the command: {exc}")
        return self._down(exc)

    async def _queue(self, pipe: Any, msg: Any) -> Callable[[list[Any]], Any] | None:
        """Add msg's commands to the pipeline; return how to build its reply, or
        None when it must run beside the pipeline."""
        ns = msg.namespace
        check_namespace(ns)
        stats = self.ns_stats.of(ns)
        if isinstance(msg, CacheGet):
            check_key(msg.key)
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
        for k in msg.keys:
            check_key(k)
        command = "UNLINK" if isinstance(msg, CacheDelete) else "EXISTS"
        self._queue_per_slot(pipe, command, [self.key(ns, k) for k in msg.keys])
        if isinstance(msg, CacheExists):
            return lambda r: sum(int(n) for n in r)

        def deleted(r: list[Any]) -> int:
            stats.deletes += sum(int(n) for n in r)
            return sum(int(n) for n in r)

        return deleted

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
        check_key(msg.key)
        if len(msg.tags) > MAX_TAGS:
            raise CacheError(f"at most {MAX_TAGS} tags per key")
        for tag in msg.tags:
            check_key(tag, "tag")
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
            pipe.set(key, data, px=ttl or None, nx=msg.mode == "NX", xx=msg.mode == "XX")
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
        stats = self.ns_stats.of(ns)
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
