"""A subscription kept alive: the one subscribe-and-retry loop of the daemon.

Whoever needs to hear some channels for as long as it runs (the approval
waiters, the HTTP caches, the bus's fire-and-forget reader) runs ``keep()``
as a task of its actor. It subscribes, retrying with backoff while the
pub/sub actor is not connected, and subscribes anew whenever the pub/sub
actor lets the subscriber go (it stopped, or restarted). ``on_up`` is called
each time the subscription holds, ``on_down`` each time it is lost: what was
published in between was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

import structlog

from actors.pubsub.messages import Detach, PubSubRef, Subscribe, Unsubscribe
from actors.pubsub.subscriber import Overflow, Sink, Subscriber

__all__ = ["Subscription"]

log = structlog.get_logger("jarvisd")


class Subscription:
    def __init__(
        self,
        pubsub: PubSubRef,
        name: str,
        *,
        sink: Sink,
        channels: Callable[[], Iterable[str]],
        overflow: Overflow = "drop",
        on_up: Callable[[], None] | None = None,
        on_down: Callable[[], None] | None = None,
    ) -> None:
        self.pubsub = pubsub
        self.name = name
        self.sink = sink
        self.channels = channels
        self.overflow = overflow
        self.on_up = on_up
        self.on_down = on_down
        self.current: Subscriber | None = None
        self.subscribed = 0  # times the subscription was made (1 + resubscriptions)

    async def keep(self) -> None:
        """Subscribe, and again each time the subscription is lost; returns
        only when cancelled (the subscriber is detached then)."""
        delay = 0.1
        while True:
            lost = asyncio.Event()
            sub = Subscriber(
                self.name,
                sink=self.sink,
                overflow=self.overflow,
                on_close=_setter(lost),
            )
            try:
                await self.pubsub.ask(Subscribe(sub, channels=tuple(self.channels())), timeout=10)
            except Exception as exc:  # pub/sub not connected (yet): try again
                log.debug("subscription_retry", subscription=self.name, error=repr(exc))
                await self._detach(sub)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            self.current = sub
            self.subscribed += 1
            if self.on_up is not None:
                self.on_up()
            try:
                await lost.wait()
            finally:
                self.current = None
                if self.on_down is not None:
                    self.on_down()
                if not lost.is_set():  # cancelled: leave no subscriber behind
                    await self._detach(sub)

    async def follow(self, added: Iterable[str] = (), removed: Iterable[str] = ()) -> None:
        """Channels to hear from now on, and channels no more. While not
        subscribed, the next subscription takes ``channels()`` as they are then."""
        sub = self.current
        if sub is None:
            return
        add, drop = tuple(added), tuple(removed)
        try:
            if add:
                await self.pubsub.ask(Subscribe(sub, channels=add), timeout=10)
            if drop:
                await self.pubsub.ask(Unsubscribe(sub, channels=drop), timeout=10)
        except Exception as exc:
            # Not connected now: the pub/sub actor keeps what is wanted and
            # subscribes to it when it connects again.
            log.info("subscription_follow_later", subscription=self.name, error=repr(exc))

    async def _detach(self, sub: Subscriber) -> None:
        sub.on_close = None
        with contextlib.suppress(Exception):  # stopping: the pub/sub actor may be gone
            await asyncio.shield(self.pubsub.ask(Detach(sub), timeout=2))


def _setter(event: asyncio.Event) -> Callable[[str], None]:
    def on_close(_reason: str) -> None:
        event.set()

    return on_close
