"""The pub/sub actors' messages, and the reference that sends them."""

from __future__ import annotations

from typing import TypeVar

from actors.events import Published
from actors.kernel import Message, Ref
from actors.pubsub.subscriber import Subscriber

__all__ = [
    "Detach",
    "PubSubMessage",
    "PubSubRef",
    "Publish",
    "PublishEvents",
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


class PublishEvents(PubSubMessage[None], frozen=True):
    """Events to ``{prefix}events`` and their kind's channel; told, never
    asked: a failure to publish is counted, never raised."""

    events: tuple[Published, ...]


class PubSubRef(Ref):
    """A pub/sub actor (``pubsub``, or ``pubsub-clients`` for what clients
    and agents can publish on)."""

    async def ask(self, msg: PubSubMessage[R], timeout: float | None = None) -> R:
        return await self._ask(msg, timeout)

    def tell_nowait(self, msg: PubSubMessage[None]) -> None:
        self._tell_nowait(msg)
