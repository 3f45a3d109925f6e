"""The pub/sub actor's connection to Redis, and how it knows it still hears.

The connection is the actor's alone, with no silent reconnects: redis-py is
told not to retry, so a broken connection surfaces here, where the gap can
be noticed and told.

Liveness is proved by a round trip, not by PING: every ``ping_interval`` the
actor publishes a heartbeat on a channel only this listener subscribes to,
through its ordinary client and, on a Redis Cluster, to another node than
the listener's. The heartbeat coming back within ``ping_timeout`` shows that
messages published elsewhere reach this connection: on a cluster, that the
listener's node still takes part in the cluster bus (a node cut from it
answers PING and delivers nothing). A heartbeat that does not come back
ends the connection (the actor moves on to the next node). Should the
heartbeat not even be sent (Redis refuses the publish), the listener falls
back to a PING on its own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from actors.redis_link import REDIS_FAILURES, RedisUnavailable
from config import PubSubSettings, RedisSettings

__all__ = ["Deaf", "Listener"]

Handle = Callable[[dict[str, Any]], None]


class Deaf(Exception):
    """The listener's connection does not hear what is published any more."""


class Listener:
    """One connection, its subscriptions, and the proof that it hears."""

    def __init__(
        self,
        url: str,
        redis_settings: RedisSettings,
        settings: Callable[[], PubSubSettings],
        *,
        client_name: str,
        control: str,
        heartbeat: Callable[[str, bytes], Awaitable[bool]],
    ) -> None:
        self.url = url
        self.redis_settings = redis_settings
        self._settings = settings
        self.client_name = client_name
        # This listener's own channel: its heartbeats, and the reason the
        # connection exists before any subscriber asks for anything.
        self.control = f"{control}:{secrets.token_hex(8)}"
        # Publishes a heartbeat somewhere else than this connection's node;
        # False when it could not be sent.
        self._heartbeat = heartbeat
        self._client: aioredis.Redis | None = None
        self.ps: Any = None  # redis.asyncio.client.PubSub of the connection
        self.lock = asyncio.Lock()  # one command at a time on the connection
        self._confirm: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        self._nonce = b""
        self.heartbeats = 0  # heartbeats that came back

    @property
    def connected(self) -> bool:
        return self.ps is not None

    async def connect(self, channels: list[str], patterns: list[str]) -> None:
        s = self.redis_settings
        self._client = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=s.connect_timeout,
            socket_timeout=s.connect_timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=self.client_name,
        )
        ps = self._client.pubsub()
        async with self.lock:
            await ps.subscribe(self.control, *channels)
            if patterns:
                await ps.psubscribe(*patterns)
            self.ps = ps

    async def close(self) -> None:
        ps, self.ps = self.ps, None
        client, self._client = self._client, None
        for futures in self._confirm.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(RedisUnavailable("the pub/sub connection was lost"))
        self._confirm.clear()
        if ps is not None:
            with contextlib.suppress(*REDIS_FAILURES, TimeoutError):
                await asyncio.wait_for(ps.aclose(), 2)
        if client is not None:
            with contextlib.suppress(*REDIS_FAILURES, TimeoutError):
                await asyncio.wait_for(client.aclose(), 2)

    # -- subscriptions -----------------------------------------------------------------------
    async def subscribe(self, channels: list[str], patterns: list[str]) -> None:
        """SUBSCRIBE/PSUBSCRIBE, and wait until Redis confirms each."""
        waits: list[asyncio.Future[None]] = []
        async with self.lock:
            ps = self.ps
            if ps is None:
                raise RedisUnavailable("pub/sub not connected")
            loop = asyncio.get_running_loop()
            for kind, names in (("subscribe", channels), ("psubscribe", patterns)):
                for name in names:
                    fut: asyncio.Future[None] = loop.create_future()
                    self._confirm.setdefault((kind, name), []).append(fut)
                    waits.append(fut)
            if channels:
                await ps.subscribe(*channels)
            if patterns:
                await ps.psubscribe(*patterns)
        if waits:
            async with asyncio.timeout(self.redis_settings.connect_timeout):
                await asyncio.gather(*waits)

    async def unsubscribe(self, channels: list[str], patterns: list[str]) -> None:
        async with self.lock:
            ps = self.ps
            if ps is None:
                return
            if channels:
                await ps.unsubscribe(*channels)
            if patterns:
                await ps.punsubscribe(*patterns)

    # -- reading -----------------------------------------------------------------------------
    async def pump(self, handle: Handle, halting: Callable[[], bool]) -> None:
        """Hand every message to ``handle`` until the connection fails or stops
        hearing (raises Deaf, or the client's error)."""
        ps = self.ps
        settings = self._settings()
        next_beat = time.monotonic()  # a first heartbeat at once: proof from the start
        waiting_since: float | None = None  # a heartbeat (or PING) is out
        pinged = False
        while not halting():
            settings = self._settings()
            message = await ps.get_message(
                ignore_subscribe_messages=False, timeout=settings.poll_interval
            )
            now = time.monotonic()
            if message is not None:
                seen = self._own(message, pinged)
                if seen == "proof":
                    waiting_since, pinged = None, False
                    next_beat = now + settings.ping_interval
                elif seen is None:
                    handle(message)
                continue
            if waiting_since is not None:
                if now - waiting_since > settings.ping_timeout:
                    what = "PING" if pinged else "its heartbeat"
                    raise Deaf(f"{what} did not come back within {settings.ping_timeout:g} s")
            elif now >= next_beat:
                waiting_since = now
                self._nonce = secrets.token_bytes(8).hex().encode()
                pinged = not await self._heartbeat(self.control, self._nonce)
                if pinged:  # the heartbeat could not be sent: prove the connection at least
                    async with self.lock:
                        await ps.ping()

    def _own(self, message: dict[str, Any], pinged: bool) -> Literal["proof", "own"] | None:
        """What the listener keeps for itself: the proof that it hears (its
        heartbeat, or the answer to its PING), or anything else of its own
        (confirmations, late heartbeats); None for what is the actor's."""
        kind = message["type"]
        if kind in ("subscribe", "psubscribe"):
            channel = _text(message.get("channel"))
            for fut in self._confirm.pop((kind, channel), []):
                if not fut.done():
                    fut.set_result(None)
            return "own"
        if kind == "message" and _text(message.get("channel")) == self.control:
            if message.get("data") == self._nonce:
                self.heartbeats += 1
                return "proof"
            return "own"  # an older heartbeat, late
        if kind == "pong":
            return "proof" if pinged else "own"
        return None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)
