"""The bus's fire-and-forget path (DESIGN §5): envelopes PUBLISHed on an
inbox's channel, handled as the stream's are but at most once; what cannot be
handled is dead-lettered and told to its agent. The same subscription hears
that agents were added or revoked (``{prefix}internal:agents``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from actors.bus.routes import Item, Outcome
from actors.bus.store import BusStats, Dead, Settler
from actors.envelope import Malformed, parse
from actors.pubsub import Delivery, PubSubRef, Subscription
from config import BusSettings

__all__ = ["PublishedReader"]

# Envelopes heard and not yet handled; past it, what comes is dropped (and
# counted by the pub/sub actor): this path is at most once.
QUEUE_SIZE = 10_000


class PublishedReader:
    """Reads the inboxes' channels through the pub/sub actor, in batches.
    Two tasks of the bus actor's run it: ``subscription.keep()`` and ``run()``."""

    def __init__(
        self,
        *,
        pubsub: PubSubRef,
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
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=QUEUE_SIZE)
        # Every inbox's channel (inboxes added later are followed as they
        # come), and the news of agents added or revoked; while the
        # subscription is lost, such news may be missed: read the agents again.
        self.subscription = Subscription(
            pubsub,
            name,
            sink=self._take,
            channels=lambda: (self.agents_channel, *self._inboxes()),
            overflow="drop",
            on_down=on_agents_notice,
        )

    def _take(self, item: Delivery) -> bool:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    async def follow(self, added: list[str], removed: list[str]) -> None:
        """Inboxes came or went: their channels too."""
        await self.subscription.follow(added, removed)

    async def run(self) -> None:
        while not self._halting():
            batch = [await self.queue.get()]
            while len(batch) < self._settings().batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            await self._handle(batch)

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
