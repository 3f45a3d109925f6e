"""The bus's fire-and-forget path (DESIGN §5): envelopes PUBLISHed on an
inbox's channel, handled as the stream's are but at most once; what cannot be
handled is dead-lettered and told to its agent. The same subscription hears
that agents were added or revoked (``{prefix}internal:agents``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from actors.bus_routes import Item, Outcome
from actors.bus_store import BusStats, Dead, Settler
from actors.envelope import Malformed, parse
from actors.kernel import Actor
from actors.pubsub import Delivery, Detach, Subscribe, Subscriber, Unsubscribe
from config import BusSettings

__all__ = ["PublishedReader"]


class PublishedReader:
    """Reads the inboxes' channels through the pub/sub actor, in batches."""

    def __init__(
        self,
        *,
        pubsub: Actor,
        name: str,
        inboxes: Callable[[], dict[str, Any]],
        settings: Callable[[], BusSettings],
        route: Callable[[list[Item]], Awaitable[dict[str, Outcome]]],
        settler: Settler,
        stats: BusStats,
        log: Any,
        halting: Callable[[], bool],
        agents_channel: str,
        on_agents_notice: Callable[[], None],
    ) -> None:
        self.pubsub = pubsub
        self.name = name
        self._inboxes = inboxes
        self._settings = settings
        self._route = route
        self.settler = settler
        self.stats = stats
        self.log = log
        self._halting = halting
        self.agents_channel = agents_channel
        self._on_agents_notice = on_agents_notice
        self.sub: Subscriber | None = None

    def _new_subscriber(self) -> Subscriber:
        self.sub = Subscriber(self.name, queue_size=10_000, overflow="drop")
        return self.sub

    async def follow(self, added: list[str], removed: list[str]) -> None:
        """Inboxes came or went: their channels too."""
        if self.sub is None:
            return  # subscribing: it takes every inbox there is then
        try:
            if added:
                await self.pubsub.ask(Subscribe(self.sub, channels=tuple(added)), timeout=10)
            if removed:
                await self.pubsub.ask(Unsubscribe(self.sub, channels=tuple(removed)), timeout=10)
        except Exception as exc:
            # Not connected now: the pub/sub actor keeps what is wanted and
            # subscribes to it when it connects again.
            self.log.info("bus_published_follow_later", error=repr(exc))

    async def run(self) -> None:
        sub = self._new_subscriber()
        try:
            await self._subscribe(sub)
            while not self._halting():
                first = await sub.next()
                if first is None:  # the pubsub actor let it go (stopping): subscribe again
                    sub = self._new_subscriber()
                    await self._subscribe(sub)
                    continue
                batch = [first]
                while len(batch) < self._settings().batch_size and not sub.queue.empty():
                    batch.append(sub.queue.get_nowait())
                await self._handle(batch)
        finally:
            self.sub = None
            try:
                await self.pubsub.ask(Detach(sub), timeout=2)
            except Exception as exc:  # stopping: the pubsub actor may be gone already
                self.log.debug("bus_detach_failed", error=repr(exc))

    async def _subscribe(self, sub: Subscriber) -> None:
        delay = 0.1
        while not self._halting():
            try:
                # Every inbox's channel (inboxes added later are subscribed
                # as they come), and the news of agents added or revoked.
                channels = (self.agents_channel, *self._inboxes())
                await self.pubsub.ask(Subscribe(sub, channels=channels), timeout=10)
                return
            except Exception as exc:  # not connected yet: try again
                self.log.debug("bus_subscribe_retry", error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _handle(self, batch: list[Delivery]) -> None:
        dead: list[Dead] = []
        good: list[Item] = []
        raws: dict[str, tuple[str, bytes]] = {}
        inboxes, limit = self._inboxes(), self._settings().max_envelope_bytes
        for n, item in enumerate(batch):
            if item.kind != "message":  # down, then gap: envelopes PUBLISHed meanwhile are lost
                self.log.warning(
                    f"bus_published_{item.kind}", detail=item.data.decode(errors="replace")
                )
                self._on_agents_notice()  # an agents notice may have been missed too
                continue
            if item.channel == self.agents_channel:
                self._on_agents_notice()
                continue
            inbox = inboxes.get(item.channel)
            if inbox is None:
                continue  # an inbox no longer read (a Redis user of the daemon's wrote it)
            self.stats.published_in += 1
            key = f"published-{n}"
            raws[key] = (item.channel, item.data)
            parsed = parse(item.data, limit)
            if isinstance(parsed, Malformed):
                dead.append(Dead(item.channel, "", item.data, parsed.reason, 1, parsed.id))
            else:
                good.append((key, parsed, inbox.sender))
        outcomes = await self._route(good)
        for key, env, _sender in good:
            if outcomes[key].kind != "done":  # at most once: nothing is retried
                channel, raw = raws[key]
                dead.append(Dead(channel, "", raw, outcomes[key].reason, 1, env.id))
        if dead:
            await self.settler.dead_letter_published(dead)
