"""The pub/sub actors' messages, and the reference that sends them."""

from __future__ import annotations

from typing import TypeVar

from actors.kernel import Message, Ref
from actors.pubsub.subscriber import Subscriber

__all__ = [
    "Detach",
    "PubSubMessage",
    "PubSubRef",
    "Publish",
    "RelayEvents",
    "Subscribe",
    "Unsubscribe",
]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)  # a message of a reply type is one of any wider type


class PubSubMessage(Message[R_co], frozen=True):
    """A message a pub/sub actor answers with ``R``."""


class Subscribe(PubSubMessage[None], frozen=True):
    """Subscribe ``subscriber`` to channels and patterns; replies once Redis
    has confirmed (a message published after that is delivered). While not
    connected it raises RedisUnavailable, and the actor keeps what is wanted:
    the next connection subscribes to it."""

    subscriber: Subscriber
    channels: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()


class Unsubscribe(PubSubMessage[None], frozen=True):
    subscriber: Subscriber
    channels: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()


class Detach(PubSubMessage[None], frozen=True):
    """Forget the subscriber entirely (its channels, its patterns)."""

    subscriber: Subscriber


class Publish(PubSubMessage[int], frozen=True):
    """PUBLISH; replies the number of receivers Redis reports."""

    channel: str
    data: bytes


class RelayEvents(PubSubMessage[int], frozen=True):
    """Events from the outbox, as sent: each to ``{prefix}events`` and its
    kind's channel, in order, in one round trip. Asked: a Redis failure is
    raised (RedisUnavailable), so that the relay sends them again."""

    events: tuple[tuple[str, bytes], ...]  # (kind, the event's JSON)


class PubSubRef(Ref):
    """A pub/sub actor (``pubsub``, or ``pubsub-clients`` for what clients
    and agents can publish on)."""

    async def ask(self, msg: PubSubMessage[R], timeout: float | None = None) -> R:
        return await self._ask(msg, timeout)

    def tell_nowait(self, msg: PubSubMessage[None]) -> None:
        self._tell_nowait(msg)
