"""The pubsub actor: one Redis pub/sub connection shared by every local
subscriber (DESIGN §3, §5, §8).

- Local subscribers (WebSocket clients, other actors) each get a bounded
  queue. A message is put on it without waiting: one that is full is either
  closed (``overflow="close"``, WebSocket clients: they are dropped with a
  reason, never allowed to slow the others) or loses that message
  (``overflow="drop"``, internal consumers). Both are counted.
- The connection is the actor's alone, with no silent reconnects: when it
  breaks (an error, or no answer to a PING within ``ping_timeout``: a
  half-open connection), the actor reconnects with jittered backoff,
  subscribes again to everything its subscribers want, and puts a
  ``subscription.gap`` notice on every subscriber's queue: messages published
  meanwhile were not received.
- Subscribing waits for Redis to confirm, so a message published after
  ``Subscribe`` returns is delivered.
- Publishing uses the actor's ordinary client; events (``PublishEvents``) go
  to ``{prefix}events`` and to their kind's channel in one round trip.
- On a Redis Cluster a message published on any node reaches every node, so
  the listener connects to one node, and after a break to the next one in
  turn of those the cluster lists then.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from actors.envelope import Event, EventKind
from actors.kernel import Health, handles
from actors.redis_link import REDIS_FAILURES, RedisClientActor, RedisUnavailable, node_url
from config import PubSubSettings, RedisSettings

__all__ = [
    "CLIENTS_PUBSUB",
    "Delivery",
    "Detach",
    "PubSub",
    "Publish",
    "PublishEvents",
    "Subscribe",
    "Subscriber",
    "Unsubscribe",
]

# The name of the second pub/sub actor: the channels agents and clients can
# publish on, and WebSocket clients (the daemon's own channels are on "pubsub").
CLIENTS_PUBSUB = "pubsub-clients"
Overflow = Literal["close", "drop"]
# What ends a listener connection: Redis failing, an unanswered PING, a closed client.
_LISTENER_FAILURES: tuple[type[BaseException], ...] = (*REDIS_FAILURES, TimeoutError, RuntimeError)
_ids = itertools.count(1)


class Delivery(msgspec.Struct, frozen=True):
    """What a subscriber receives: a message; "down" when the connection to
    Redis is lost; "gap" once it is back (what was published meanwhile was
    missed)."""

    kind: Literal["message", "gap", "down"]
    channel: str = ""
    pattern: str | None = None
    data: bytes = b""


_CLOSED = Delivery("gap", data=b"closed")  # the end-of-queue marker, compared by identity


Sink = Callable[[Delivery], bool]


class Subscriber:
    """A local receiver of pub/sub messages: a bounded queue, or a ``sink``
    that takes each delivery at once without waiting (a WebSocket writing to
    its socket's bounded buffer). Either one answers False when it is full."""

    def __init__(
        self,
        name: str,
        *,
        queue_size: int = 1000,
        overflow: Overflow = "close",
        sink: Sink | None = None,
        on_close: Callable[[str], None] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.name = name
        self.overflow = overflow
        self.sink = sink
        self.on_close = on_close
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=queue_size)
        self.channels: set[str] = set()
        self.patterns: set[str] = set()
        self.closed: str | None = None  # why, once closed
        self.dropped = 0

    def offer(self, item: Delivery) -> bool:
        """Take ``item`` without waiting; False when there is no room for it."""
        if self.closed is not None:
            return True
        if self.sink is not None:
            return self.sink(item)
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            if self.on_close is not None:
                self.on_close(reason)
            # Wakes a reader waiting on an empty queue; a full one has items
            # to read first, and then finds it closed.
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(_CLOSED)

    async def next(self) -> Delivery | None:
        """The next delivery, or None once the subscriber is closed."""
        if self.closed is not None and self.queue.empty():
            return None
        item = await self.queue.get()
        return None if item is _CLOSED else item


# -- messages ---------------------------------------------------------------------------
class Subscribe(msgspec.Struct, frozen=True):
    """Subscribe ``subscriber`` to channels and patterns; replies once Redis has confirmed."""

    subscriber: Any  # Subscriber
    channels: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()


class Unsubscribe(msgspec.Struct, frozen=True):
    subscriber: Any
    channels: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()


class Detach(msgspec.Struct, frozen=True):
    """Forget the subscriber entirely (its channels, its patterns)."""

    subscriber: Any


class Publish(msgspec.Struct, frozen=True):
    """PUBLISH; replies the number of receivers Redis reports."""

    channel: str
    data: bytes


class PublishEvents(msgspec.Struct, frozen=True):
    """Events to ``{prefix}events`` and their kind's channel; fire and forget."""

    events: tuple[tuple[EventKind, Event], ...]


# ARGV: the events channel, then (kind channel, message) pairs. Every event in
# one round trip, to both of its channels.
PUBLISH_MANY = """
for i = 2, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[1], ARGV[i + 1])
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return (#ARGV - 1) / 2
"""


@dataclass
class PubSubStats:
    received: int = 0
    delivered: int = 0
    dropped_messages: int = 0
    dropped_subscribers: int = 0
    published: int = 0
    publish_errors: int = 0
    events_published: int = 0
    reconnects: int = 0
    gaps: int = 0
    connections: int = 0
    last_error: str = ""
    node: str = ""  # on a cluster: the node the listener is on


class PubSub(RedisClientActor):
    client_name: ClassVar[str] = "jarvisd-pubsub"

    def __init__(
        self,
        redis_settings: RedisSettings,
        settings: PubSubSettings,
        url: str,
        *,
        name: str = "pubsub",
        health_interval: float = 2.0,
    ) -> None:
        super().__init__(
            name,
            redis_settings,
            url,
            mailbox_size=10_000,
            concurrency=4,
            health_interval=health_interval,
        )
        self.settings = settings
        self.ps_stats = PubSubStats()
        self._channels: dict[str, set[Subscriber]] = {}
        self._patterns: dict[str, set[Subscriber]] = {}
        self._listener: aioredis.Redis | None = None
        self._ps: Any = None  # redis.asyncio.client.PubSub of the current connection
        self._lock = asyncio.Lock()
        self._confirm: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        self._pong: asyncio.Event = asyncio.Event()
        self._encoder = msgspec.json.Encoder()
        self._publish_many: Any = None
        self._node_turn = -1

    async def on_start(self) -> None:
        await super().on_start()
        self._publish_many = self._client().register_script(PUBLISH_MANY)

    @property
    def events_channel(self) -> str:
        return f"{self.redis_settings.prefix}events"

    def channel_of(self, kind: str) -> str:
        return f"{self.redis_settings.prefix}{kind}"

    @property
    def control_channel(self) -> str:
        # Always subscribed, so the connection exists (and is pinged) even
        # before any subscriber asks for anything.
        return f"{self.redis_settings.prefix}internal:pubsub"

    # -- the connection -----------------------------------------------------------------
    async def on_stop(self) -> None:
        await self._drop_connection()
        for sub in self._subscribers():
            sub.close("the pub/sub actor stopped")
            self._forget(sub)
        await super().on_stop()

    def _subscribers(self) -> set[Subscriber]:
        return {s for g in (*self._channels.values(), *self._patterns.values()) for s in g}

    async def run(self) -> None:
        delay = 0.1
        attempt = 0
        while not self._halting:
            try:
                await self._connect()
                if attempt:
                    self._gap("the pub/sub connection to Redis was re-established")
                attempt += 1
                delay = 0.1
                await self._pump()
            except _LISTENER_FAILURES as exc:
                self.ps_stats.last_error = f"{type(exc).__name__}: {exc}"
                self.log.warning("pubsub_disconnected", error=self.ps_stats.last_error)
                down = Delivery("down", data=self.ps_stats.last_error.encode())
                for sub in self._subscribers():
                    sub.offer(down)
            await self._drop_connection()
            if self.halting():
                return
            # Jittered exponential backoff, capped.
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, self.settings.reconnect_max)

    async def _connect(self) -> None:
        s = self.redis_settings
        # No retries inside redis-py: a broken connection must surface here,
        # where the gap is noticed and told, never be repaired silently.
        self._listener = aioredis.Redis.from_url(
            await self._listener_url(),
            socket_connect_timeout=s.connect_timeout,
            socket_timeout=s.connect_timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=f"{self.redis_client_name}-listener",
        )
        ps = self._listener.pubsub()
        async with self._lock:
            await ps.subscribe(self.control_channel, *self._channels)
            if self._patterns:
                await ps.psubscribe(*self._patterns)
            self._ps = ps
        self.ps_stats.connections += 1
        if self.ps_stats.connections > 1:
            self.ps_stats.reconnects += 1
        self.log.info(
            "pubsub_connected", channels=len(self._channels), patterns=len(self._patterns)
        )
        # Report the new state now rather than at the check's next turn.
        await self.refresh_health()

    async def _listener_url(self) -> str:
        client = self._client()
        if not isinstance(client, RedisCluster):
            return self.url
        await client.initialize()
        if self.ps_stats.node:
            # Moving on after a break: ask the cluster who is there now, so that
            # a dead node is not tried again and a promoted replica is.
            with contextlib.suppress(*REDIS_FAILURES):
                await client.nodes_manager.initialize()
        nodes = sorted(client.get_nodes(), key=lambda n: n.name)
        self._node_turn += 1
        node = nodes[self._node_turn % len(nodes)]
        self.ps_stats.node = node.name
        return node_url(self.url, node.host, int(node.port))

    async def _drop_connection(self) -> None:
        ps, self._ps = self._ps, None
        listener, self._listener = self._listener, None
        for futures in self._confirm.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(RedisUnavailable("the pub/sub connection was lost"))
        self._confirm.clear()
        if ps is not None:
            with contextlib.suppress(*REDIS_FAILURES, TimeoutError):
                await asyncio.wait_for(ps.aclose(), 2)
        if listener is not None:
            with contextlib.suppress(*REDIS_FAILURES, TimeoutError):
                await asyncio.wait_for(listener.aclose(), 2)

    async def _pump(self) -> None:
        """Read until the connection fails; PING when idle, and treat a PING
        without an answer as a dead connection."""
        ps = self._ps
        poll = self.settings.poll_interval
        last_ping = time.monotonic()
        awaiting_pong_since: float | None = None
        while not self._halting:
            message = await ps.get_message(ignore_subscribe_messages=False, timeout=poll)
            now = time.monotonic()
            if message is not None:
                self._handle(message)
                if message["type"] == "pong":
                    awaiting_pong_since = None
                continue
            if awaiting_pong_since is not None:
                if now - awaiting_pong_since > self.settings.ping_timeout:
                    raise TimeoutError(f"no answer to PING within {self.settings.ping_timeout:g} s")
            elif now - last_ping >= self.settings.ping_interval:
                last_ping = awaiting_pong_since = now
                async with self._lock:
                    await ps.ping()

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = _text(message.get("channel"))
        if kind in ("subscribe", "psubscribe"):
            for fut in self._confirm.pop((kind, channel), []):
                if not fut.done():
                    fut.set_result(None)
            return
        if kind == "message":
            if channel == self.control_channel:
                return
            targets = self._channels.get(channel, ())
            pattern = None
        elif kind == "pmessage":
            pattern = _text(message.get("pattern"))
            targets = self._patterns.get(pattern, ())
        else:
            return
        self.ps_stats.received += 1
        data = message["data"]
        item = Delivery("message", channel, pattern, data if isinstance(data, bytes) else b"")
        for sub in list(targets):
            self._offer(sub, item)

    def _offer(self, sub: Subscriber, item: Delivery) -> None:
        if sub.offer(item):
            self.ps_stats.delivered += 1
            return
        if sub.overflow == "drop":
            sub.dropped += 1
            self.ps_stats.dropped_messages += 1
            return
        # A subscriber that cannot keep up is let go, never waited for.
        self.ps_stats.dropped_subscribers += 1
        waiting = "its buffer is full" if sub.sink else f"{sub.queue.qsize()} messages were waiting"
        sub.close(f"too slow: {waiting}")
        self._forget(sub)

    def _gap(self, reason: str) -> None:
        self.ps_stats.gaps += 1
        item = Delivery("gap", data=reason.encode())
        for sub in self._subscribers():
            self._offer(sub, item)

    def _forget(self, sub: Subscriber) -> tuple[list[str], list[str]]:
        """Remove ``sub`` everywhere; returns the channels and patterns nobody wants now."""
        empty_channels, empty_patterns = [], []
        for channel in list(sub.channels):
            group = self._channels.get(channel)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._channels[channel]
                    empty_channels.append(channel)
        for pattern in list(sub.patterns):
            group = self._patterns.get(pattern)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._patterns[pattern]
                    empty_patterns.append(pattern)
        sub.channels.clear()
        sub.patterns.clear()
        return empty_channels, empty_patterns

    # -- handlers ------------------------------------------------------------------------
    @handles(Subscribe)
    async def _subscribe(self, msg: Subscribe) -> None:
        sub: Subscriber = msg.subscriber
        if sub.closed is not None:
            raise RedisUnavailable(f"subscriber closed: {sub.closed}")
        new_channels = [c for c in msg.channels if c not in self._channels]
        new_patterns = [p for p in msg.patterns if p not in self._patterns]
        for c in msg.channels:
            self._channels.setdefault(c, set()).add(sub)
            sub.channels.add(c)
        for p in msg.patterns:
            self._patterns.setdefault(p, set()).add(sub)
            sub.patterns.add(p)
        waits: list[asyncio.Future[None]] = []
        async with self._lock:
            ps = self._ps
            if ps is None:
                # Not connected: the reconnect subscribes to everything wanted.
                raise RedisUnavailable(
                    f"pub/sub not connected ({self.ps_stats.last_error or 'connecting'})"
                )
            loop = asyncio.get_running_loop()
            for kind, names in (("subscribe", new_channels), ("psubscribe", new_patterns)):
                for name in names:
                    fut: asyncio.Future[None] = loop.create_future()
                    self._confirm.setdefault((kind, name), []).append(fut)
                    waits.append(fut)
            try:
                if new_channels:
                    await ps.subscribe(*new_channels)
                if new_patterns:
                    await ps.psubscribe(*new_patterns)
            except REDIS_FAILURES as exc:
                raise self._down(exc) from exc
        if waits:
            async with asyncio.timeout(self.redis_settings.connect_timeout):
                await asyncio.gather(*waits)

    @handles(Unsubscribe)
    async def _unsubscribe(self, msg: Unsubscribe) -> None:
        sub: Subscriber = msg.subscriber
        gone_channels, gone_patterns = [], []
        for c in msg.channels:
            group = self._channels.get(c)
            sub.channels.discard(c)
            if group is not None and sub in group:
                group.discard(sub)
                if not group:
                    del self._channels[c]
                    gone_channels.append(c)
        for p in msg.patterns:
            group = self._patterns.get(p)
            sub.patterns.discard(p)
            if group is not None and sub in group:
                group.discard(sub)
                if not group:
                    del self._patterns[p]
                    gone_patterns.append(p)
        await self._release(gone_channels, gone_patterns)

    @handles(Detach)
    async def _detach(self, msg: Detach) -> None:
        await self._release(*self._forget(msg.subscriber))

    async def _release(self, channels: list[str], patterns: list[str]) -> None:
        async with self._lock:
            ps = self._ps
            if ps is None:
                return
            try:
                if channels:
                    await ps.unsubscribe(*channels)
                if patterns:
                    await ps.punsubscribe(*patterns)
            except REDIS_FAILURES as exc:
                self.log.warning("pubsub_unsubscribe_failed", error=repr(exc))

    @handles(Publish)
    async def _publish(self, msg: Publish) -> int:
        try:
            receivers = int(await self._client().publish(msg.channel, msg.data))
        except REDIS_FAILURES as exc:
            self.ps_stats.publish_errors += 1
            raise self._down(exc) from exc
        self.ps_stats.published += 1
        return receivers

    @handles(PublishEvents)
    async def _publish_events(self, msg: PublishEvents) -> None:
        args: list[Any] = [self.events_channel]
        for kind, evt in msg.events:
            args += (self.channel_of(kind), self._encoder.encode(evt))
        try:
            await self._publish_many(args=args)
        except REDIS_FAILURES as exc:
            # Events are notifications (the state is in PostgreSQL): a lost
            # one is counted, and never fails the actor.
            self.ps_stats.publish_errors += len(msg.events)
            self.log.warning("events_not_published", count=len(msg.events), error=repr(exc))
            return
        self.ps_stats.events_published += len(msg.events)

    # -- health ---------------------------------------------------------------------------
    async def check(self) -> Health | None:
        if self._ps is None:
            detail = f"not connected: {self.ps_stats.last_error or 'connecting'}"
            return Health(status="fail", detail=detail)
        return await super().check()

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        st = self.ps_stats
        data["pubsub"] = {
            "connected": self._ps is not None,
            "subscribers": len(self._subscribers()),
            "channels": len(self._channels),
            "patterns": len(self._patterns),
            "received": st.received,
            "delivered": st.delivered,
            "droppedMessages": st.dropped_messages,
            "droppedSubscribers": st.dropped_subscribers,
            "published": st.published,
            "eventsPublished": st.events_published,
            "publishErrors": st.publish_errors,
            "reconnects": st.reconnects,
            "gaps": st.gaps,
        }
        if st.node:
            data["pubsub"]["node"] = st.node
        return data


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)
