"""The Redis connection owner for health and server facts (DESIGN §3).

The cache, sessions, pub/sub and bus actors own their own connections; this
one answers "is Redis there, how fast, what is it" for /health and /redis/*.
redis-py reconnects by itself on the next command, so a restarted server
needs no action here beyond the next check.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError

from actors.kernel import Actor, Health, Message, Ref, handles
from config import RedisSettings

__all__ = [
    "REDIS_FAILURES",
    "RedisClient",
    "RedisClientActor",
    "RedisInfo",
    "RedisLink",
    "RedisMessage",
    "RedisPing",
    "RedisRef",
    "RedisUnavailable",
    "cluster_seeds",
    "connect_redis",
    "is_cluster",
    "node_url",
]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)  # a message of a reply type is one of any wider type
# One server or a cluster: the actors use what both answer alike.
RedisClient = aioredis.Redis | RedisCluster
# "Redis cannot serve this now": the cluster client raises some of it (no node
# answers, a slot without a primary) outside RedisError.
REDIS_FAILURES: tuple[type[BaseException], ...] = (OSError, RedisError, RedisClusterException)


class RedisUnavailable(Exception):
    """Redis cannot be reached right now (HTTP maps this to 503)."""


class RedisMessage(Message[R_co], frozen=True):
    """A message the Redis health actor answers with ``R``."""


class RedisPing(RedisMessage[float], frozen=True):
    """PING; replies with the latency in ms."""


class RedisInfo(RedisMessage[dict[str, Any]], frozen=True):
    """A few INFO fields (version, memory, clients, keys)."""


def is_cluster(url: str, settings: RedisSettings | None = None) -> bool:
    """A Redis Cluster: ``redis.cluster = true`` or a ``redis+cluster://`` URL."""
    return bool(settings and settings.cluster) or urlsplit(url).scheme.endswith("+cluster")


def cluster_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``redis+cluster://[user:pass@]h1:p1,h2:p2/`` → (a plain URL of the
    first node with the credentials and options, every seed as (host, port))."""
    parts = urlsplit(url)
    scheme = parts.scheme.removesuffix("+cluster")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    for item in hosts.split(","):
        item = item.strip()
        if item.startswith("[") and item.endswith("]"):  # [IPv6] without a port
            host, port = item, ""
        else:
            host, _, port = item.rpartition(":")
            if not host:
                host, port = port, ""
        seeds.append((host.strip("[]"), int(port or 6379)))
    if not seeds or not seeds[0][0]:
        raise ValueError(f"no cluster node in {url!r}")
    first = f"{userinfo}@{hosts.split(',')[0]}" if userinfo else hosts.split(",")[0]
    return urlunsplit((scheme, first, parts.path, parts.query, "")), seeds


def node_url(url: str, host: str, port: int) -> str:
    """The URL of one cluster node, with ``url``'s scheme, credentials and options."""
    plain, _seeds = cluster_seeds(url) if is_cluster(url) else (url, [])
    parts = urlsplit(plain)
    userinfo = parts.netloc.rpartition("@")[0]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    netloc = f"{userinfo}@{where}" if userinfo else where
    return urlunsplit((parts.scheme, netloc, "", parts.query, ""))


def connect_redis(
    url: str,
    settings: RedisSettings | None = None,
    *,
    name: str = "jarvisd",
    timeout: float | None = None,
    read_timeout: float | None = None,
) -> RedisClient:
    """A client for ``url``: one server, or a Redis Cluster (``is_cluster``)
    through redis-py's cluster client, which follows MOVED/ASK and finds the
    new primary after a failover by itself. ``timeout`` bounds connecting and
    each reply; ``read_timeout``, if given, each reply instead (a client for
    blocking reads waits longer than it takes to connect)."""
    wait = timeout if timeout is not None else (settings.connect_timeout if settings else 5.0)
    reply_wait = read_timeout if read_timeout is not None else wait
    if not is_cluster(url, settings):
        return aioredis.Redis.from_url(
            url,
            socket_connect_timeout=wait,
            socket_timeout=reply_wait,
            health_check_interval=30,
            client_name=name,
        )
    plain, seeds = cluster_seeds(url) if urlsplit(url).scheme.endswith("+cluster") else (url, [])
    nodes = [ClusterNode(host, port) for host, port in seeds]
    return RedisCluster.from_url(
        plain,
        startup_nodes=nodes or None,
        socket_connect_timeout=wait,
        socket_timeout=reply_wait,
        client_name=name,
        # Tries again at once after a connection error or a cluster in
        # failover, reading the slot map again before each try; what still
        # fails answers 503 until a replica has taken over.
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 8),
    )


class RedisClientActor(Actor):
    """An actor that owns one redis-py client (with its own connection pool).

    Subclasses name their client (``CLIENT SETNAME``) and the error they raise
    when Redis cannot be reached; the client, its health probe and its closing
    are the same for all of them."""

    client_name: ClassVar[str] = "jarvisd"
    unavailable: ClassVar[type[RedisUnavailable]] = RedisUnavailable

    def __init__(
        self,
        name: str,
        redis_settings: RedisSettings,
        url: str,
        *,
        client_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, **kwargs)
        self.redis_settings = redis_settings
        self.url = url
        self.redis_client_name = client_name or self.client_name
        self.client: RedisClient | None = None
        self.cluster = is_cluster(url, redis_settings)

    async def on_start(self) -> None:
        self.client = connect_redis(self.url, self.redis_settings, name=self.redis_client_name)

    async def on_stop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    def _client(self) -> RedisClient:
        if self.client is None:
            raise self.unavailable(f"{self.name}: redis client not started")
        return self.client

    def _down(self, exc: BaseException) -> RedisUnavailable:
        return self.unavailable(f"redis unreachable: {type(exc).__name__}: {exc}")

    async def ping_ms(self) -> float:
        started = time.perf_counter()
        try:
            await self._client().ping()
        except REDIS_FAILURES as exc:
            raise self._down(exc) from exc
        return (time.perf_counter() - started) * 1000

    async def check(self) -> Health | None:
        try:
            ms = await self.ping_ms()
        except RedisUnavailable as exc:
            return Health(status="fail", detail=str(exc))
        return Health(status="pass", detail="ok", observed_ms=round(ms, 3))


class RedisLink(RedisClientActor):
    client_name: ClassVar[str] = "jarvisd-health"

    def __init__(
        self,
        settings: RedisSettings,
        url: str,
        *,
        name: str = "redis",
        health_interval: float = 2.0,
    ) -> None:
        super().__init__(
            name, settings, url, mailbox_size=100, concurrency=2, health_interval=health_interval
        )

    @handles(RedisPing)
    async def _ping(self, _msg: RedisPing) -> float:
        return await self.ping_ms()

    @handles(RedisInfo)
    async def _info(self, _msg: RedisInfo) -> dict[str, Any]:
        client = self._client()
        extra: dict[str, Any] = {}
        try:
            info = await client.info()
            if isinstance(client, RedisCluster):
                primaries = client.get_primaries()
                sizes: Any = await client.dbsize(target_nodes=RedisCluster.PRIMARIES)
                keys = sum(sizes.values()) if isinstance(sizes, dict) else int(sizes)
                extra["cluster"] = {
                    "primaries": sorted(n.name for n in primaries),
                    "nodes": len(client.get_nodes()),
                }
            else:
                keys = await client.dbsize()
        except REDIS_FAILURES as exc:
            raise self._down(exc) from exc
        return extra | {
            "version": info.get("valkey_version") or info.get("redis_version"),
            "mode": info.get("redis_mode"),
            "uptimeSeconds": info.get("uptime_in_seconds"),
            "connectedClients": info.get("connected_clients"),
            "usedMemoryBytes": info.get("used_memory"),
            "keys": keys,
            "prefix": self.redis_settings.prefix,
        }


class RedisRef(Ref):
    """The Redis health actor: PING and INFO for /health and /redis/*."""

    async def ask(self, msg: RedisMessage[R], timeout: float | None = None) -> R:
        return await self._ask(msg, timeout)
