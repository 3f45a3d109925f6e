"""The pubsub actor: one Redis pub/sub connection shared by every local
subscriber (DESIGN §3, §5, §8).

- Local subscribers (WebSocket clients, other actors) each get a bounded
  queue or a sink, offered each message without waiting (``subscriber``).
- The connection (``listener``) proves that it hears by a heartbeat that
  goes through Redis and comes back. When it breaks or stops hearing, every
  subscriber is told "down" (once an outage, however many tries it takes to
  end); the actor reconnects with jittered backoff (on
  a Redis Cluster to the next node the cluster lists then), subscribes again
  to everything its subscribers want, and tells each of them "gap":
  messages published meanwhile were not received.
- Subscribing waits for Redis to confirm, so a message published after
  ``Subscribe`` returns is delivered.
- Publishing uses the actor's ordinary client; events from the outbox
  (``RelayEvents``) go to ``{prefix}events`` and to their kind's channel, in
  order, in one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
from redis.asyncio.cluster import RedisCluster

from actors.kernel import Health, handles
from actors.pubsub.listener import Deaf, Listener
from actors.pubsub.messages import Detach, Publish, RelayEvents, Subscribe, Unsubscribe
from actors.pubsub.subscriber import Delivery, Subscriber
from actors.redis_link import REDIS_FAILURES, RedisClientActor, RedisUnavailable, node_url
from config import PubSubSettings, RedisSettings

__all__ = ["CLIENTS_PUBSUB", "PubSub", "changes_channel"]


def changes_channel(prefix: str) -> str:
    """Told once per batch of events relayed: what the list caches follow
    (one message a batch, not one an event, for every daemon to read)."""
    return f"{prefix}internal:changes"


# The name of the second pub/sub actor: the channels agents and clients can
# publish on, and WebSocket clients (the daemon's own channels are on "pubsub").
CLIENTS_PUBSUB = "pubsub-clients"
# What ends a listener connection: Redis failing, no proof of hearing, a closed client.
_LISTENER_FAILURES: tuple[type[BaseException], ...] = (
    *REDIS_FAILURES,
    TimeoutError,
    RuntimeError,
    Deaf,
)

# ARGV: the events channel, then (kind channel, message) pairs. Every event in
# one round trip, to both of its channels.
# ARGV: {prefix}events, {prefix}internal:changes, then (channel, body) pairs;
# the batch is told once on the changes channel, after its events.
PUBLISH_MANY = """
for i = 3, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[1], ARGV[i + 1])
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
local n = (#ARGV - 2) / 2
redis.call('PUBLISH', ARGV[2], tostring(n))
return n
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
    deaf: int = 0  # connections given up because the heartbeat did not come back
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
        self._listener: Listener | None = None
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
    def control_prefix(self) -> str:
        return f"{self.redis_settings.prefix}internal:pubsub"

    @property
    def connected(self) -> bool:
        return self._listener is not None and self._listener.connected

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
        told = False  # subscribers know of this outage: one "down" each, however long
        while not self._halting:
            try:
                listener = await self._connect()
                if attempt:
                    self._gap("the pub/sub connection to Redis was re-established")
                attempt += 1
                delay = 0.1
                told = False
                await listener.pump(self._handle, self.halting)
            except _LISTENER_FAILURES as exc:
                if isinstance(exc, Deaf):
                    self.ps_stats.deaf += 1
                self.ps_stats.last_error = f"{type(exc).__name__}: {exc}"
                self.log.warning(
                    "pubsub_disconnected", error=self.ps_stats.last_error, node=self.ps_stats.node
                )
                if not told:
                    down = Delivery("down", data=self.ps_stats.last_error.encode())
                    for sub in self._subscribers():
                        sub.offer(down)
                    told = True
            await self._drop_connection()
            if self.halting():
                return
            # Jittered exponential backoff, capped.
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, self.settings.reconnect_max)

    async def _connect(self) -> Listener:
        listener = Listener(
            await self._listener_url(),
            self.redis_settings,
            lambda: self.settings,
            client_name=f"{self.redis_client_name}-listener",
            control=self.control_prefix,
            heartbeat=self._heartbeat,
        )
        self._listener = listener
        await listener.connect(list(self._channels), list(self._patterns))
        self.ps_stats.connections += 1
        if self.ps_stats.connections > 1:
            self.ps_stats.reconnects += 1
        self.log.info(
            "pubsub_connected",
            channels=len(self._channels),
            patterns=len(self._patterns),
            node=self.ps_stats.node or None,
        )
        # Report the new state now rather than at the check's next turn.
        await self.refresh_health()
        return listener

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
        left = self.ps_stats.node
        if len(nodes) > 1:
            # Never the node just given up on, whatever the cluster lists now.
            nodes = [n for n in nodes if n.name != left] or nodes
        self._node_turn += 1
        node = nodes[self._node_turn % len(nodes)]
        self.ps_stats.node = node.name
        return node_url(self.url, node.host, int(node.port))

    async def _heartbeat(self, channel: str, nonce: bytes) -> bool:
        """Publish the listener's heartbeat; on a cluster, on a node other
        than the listener's, so that it must cross the cluster bus."""
        client = self._client()
        try:
            if isinstance(client, RedisCluster):
                others = [n for n in client.get_primaries() if n.name != self.ps_stats.node]
                target = others[0] if others else client.get_random_node()
                await client.execute_command("PUBLISH", channel, nonce, target_nodes=target)
            else:
                await client.publish(channel, nonce)
        except REDIS_FAILURES as exc:
            self.log.info("pubsub_heartbeat_not_sent", error=repr(exc))
            return False
        return True

    async def _drop_connection(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "message":
            channel = _text(message.get("channel"))
            targets = self._channels.get(channel, ())
            pattern = None
        elif kind == "pmessage":
            channel = _text(message.get("channel"))
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
            if self._leave(self._channels, channel, sub):
                empty_channels.append(channel)
        for pattern in list(sub.patterns):
            if self._leave(self._patterns, pattern, sub):
                empty_patterns.append(pattern)
        sub.channels.clear()
        sub.patterns.clear()
        return empty_channels, empty_patterns

    @staticmethod
    def _leave(table: dict[str, set[Subscriber]], name: str, sub: Subscriber) -> bool:
        """Take ``sub`` off ``name``; True when nobody wants ``name`` now."""
        group = table.get(name)
        if group is None or sub not in group:
            return False
        group.discard(sub)
        if group:
            return False
        del table[name]
        return True

    # -- handlers ------------------------------------------------------------------------
    @handles(Subscribe)
    async def _subscribe(self, msg: Subscribe) -> None:
        sub = msg.subscriber
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
        listener = self._listener
        if listener is None or not listener.connected:
            # Not connected: the reconnect subscribes to everything wanted.
            raise RedisUnavailable(
                f"pub/sub not connected ({self.ps_stats.last_error or 'connecting'})"
            )
        try:
            await listener.subscribe(new_channels, new_patterns)
        except REDIS_FAILURES as exc:
            raise self._down(exc) from exc

    @handles(Unsubscribe)
    async def _unsubscribe(self, msg: Unsubscribe) -> None:
        sub = msg.subscriber
        gone_channels, gone_patterns = [], []
        for c in msg.channels:
            sub.channels.discard(c)
            if self._leave(self._channels, c, sub):
                gone_channels.append(c)
        for p in msg.patterns:
            sub.patterns.discard(p)
            if self._leave(self._patterns, p, sub):
                gone_patterns.append(p)
        await self._release(gone_channels, gone_patterns)

    @handles(Detach)
    async def _detach(self, msg: Detach) -> None:
        await self._release(*self._forget(msg.subscriber))

    async def _release(self, channels: list[str], patterns: list[str]) -> None:
        listener = self._listener
        if listener is None or not (channels or patterns):
            return
        try:
            await listener.unsubscribe(channels, patterns)
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

    @handles(RelayEvents)
    async def _relay_events(self, msg: RelayEvents) -> int:
        args: list[Any] = [self.events_channel, changes_channel(self.redis_settings.prefix)]
        for kind, body in msg.events:
            args += (self.channel_of(kind), body)
        try:
            await self._publish_many(args=args)
        except REDIS_FAILURES as exc:
            self.ps_stats.publish_errors += len(msg.events)
            raise RedisUnavailable(f"events not published: {exc!r}") from exc
        self.ps_stats.events_published += len(msg.events)
        return len(msg.events)

    # -- health ---------------------------------------------------------------------------
    async def check(self) -> Health | None:
        if not self.connected:
            detail = f"not connected: {self.ps_stats.last_error or 'connecting'}"
            return Health(status="fail", detail=detail)
        return await super().check()

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        st = self.ps_stats
        data["pubsub"] = {
            "connected": self.connected,
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
            "deaf": st.deaf,
            "heartbeats": self._listener.heartbeats if self._listener is not None else 0,
            "gaps": st.gaps,
        }
        if st.node:
            data["pubsub"]["node"] = st.node
        return data


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)
