"""The Redis connection owner for health and server facts (DESIGN §3).

The cache, sessions, pub/sub and bus actors own their own connections; this
one answers "is Redis there, how fast, what is it" for /health and /redis/*.
redis-py reconnects by itself on the next command, so a restarted server
needs no action here beyond the next check.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from actors.kernel import Actor, Health, handles
from config import RedisSettings

__all__ = [
    "RedisClientActor",
    "RedisInfo",
    "RedisLink",
    "RedisPing",
    "RedisUnavailable",
    "connect_redis",
]


class RedisUnavailable(Exception):
    """Redis cannot be reached right now (HTTP maps this to 503)."""


class RedisPing(msgspec.Struct, frozen=True):
    """PING; replies with the latency in ms."""


class RedisInfo(msgspec.Struct, frozen=True):
    """Replies with a few INFO fields (version, memory, clients, keys)."""


def connect_redis(url: str, settings: RedisSettings, *, name: str = "jarvisd") -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=settings.connect_timeout,
        socket_timeout=settings.connect_timeout,
        health_check_interval=30,
        client_name=name,
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
        self.client: aioredis.Redis | None = None

    async def on_start(self) -> None:
        self.client = connect_redis(self.url, self.redis_settings, name=self.redis_client_name)

    async def on_stop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    def _client(self) -> aioredis.Redis:
        if self.client is None:
            raise self.unavailable(f"{self.name}: redis client not started")
        return self.client

    def _down(self, exc: BaseException) -> RedisUnavailable:
        return self.unavailable(f"redis unreachable: {type(exc).__name__}: {exc}")

    async def ping_ms(self) -> float:
        started = time.perf_counter()
        try:
            await self._client().ping()
        except (OSError, RedisError) as exc:
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
        try:
            info = await self._client().info()
            keys = await self._client().dbsize()
        except (OSError, RedisError) as exc:
            raise self._down(exc) from exc
        return {
            "version": info.get("valkey_version") or info.get("redis_version"),
            "mode": info.get("redis_mode"),
            "uptimeSeconds": info.get("uptime_in_seconds"),
            "connectedClients": info.get("connected_clients"),
            "usedMemoryBytes": info.get("used_memory"),
            "keys": keys,
            "prefix": self.redis_settings.prefix,
        }
