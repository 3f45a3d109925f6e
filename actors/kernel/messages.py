"""Messages and their handlers.

A message is a frozen msgspec Struct that names its reply type:
``class GetUser(Message[User])`` is answered with a ``User``. ``ask`` returns
exactly that type to mypy, and ``@handles(GetUser)`` on a handler that
returns anything else is a type error.

Handlers are methods of the actor (``@handles`` in the class body) or
functions in a ``Room``: a module that keeps some of an actor's messages
right beside the handlers that answer them (an actor's reads, writes and
scans are rooms of their own), so that going to a message's definition lands
next to the code that answers it. A room may name a ``lane``: its messages
then queue in a mailbox of their own with workers of their own, and a slow
operation never holds up the fast ones queued behind it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

__all__ = ["Handler", "LaneSpec", "Message", "Room", "handler_table", "handles"]

R = TypeVar("R")
# Covariant: a message replied with a list is also one replied with an iterable.
R_co = TypeVar("R_co", covariant=True)
S = TypeVar("S")
M = TypeVar("M")
C = TypeVar("C")

# A handler as the kernel calls it: (the actor, the message) -> the reply.
Handler = Callable[[Any, Any], Awaitable[Any]]
_MARK = "_jarvisd_handles"


class Message(msgspec.Struct, Generic[R_co], frozen=True):
    """Base of every actor message; ``R`` is the type of its reply (None for
    messages only ever told)."""


@dataclass(frozen=True, slots=True)
class LaneSpec:
    """A mailbox of its own beside the actor's main one: its bound and the
    number of workers that serve it. Overflow policy: as the main mailbox
    (``tell`` waits, ``tell_nowait``/``ask_nowait`` raise MailboxFull)."""

    mailbox_size: int = 100
    concurrency: int = 1


def handles(
    msg_type: type[Message[R]],
) -> Callable[[Callable[[S, M], Awaitable[R]]], Callable[[S, M], Awaitable[R]]]:
    """Mark an actor's ``async def`` method as the handler of ``msg_type``;
    it must return the message's reply type."""

    def mark(fn: Callable[[S, M], Awaitable[R]]) -> Callable[[S, M], Awaitable[R]]:
        fn.__dict__[_MARK] = msg_type
        return fn

    return mark


def handler_table(cls: Any, main: str) -> tuple[dict[type, Handler], dict[type, str]]:
    """An actor class's handlers by message type, and the lane of each message:
    its rooms' functions, then its ``@handles`` methods (a subclass's win),
    then its ``batched`` messages (answered by ``handle_batch``)."""
    handlers: dict[type, Handler] = {}
    lane_of: dict[type, str] = {}
    for room in cls.rooms:
        for msg_type, fn in room.handlers.items():
            handlers[msg_type] = fn
            lane_of[msg_type] = room.lane or main
    for klass in reversed(cls.__mro__):
        for value in vars(klass).values():
            msg_type = getattr(value, _MARK, None)
            if msg_type is not None:
                handlers[msg_type] = value
                lane_of[msg_type] = main
    for msg_type in cls.batched:
        lane_of.setdefault(msg_type, main)
    for msg_type, lane in lane_of.items():
        if lane != main and lane not in cls.lanes:
            raise TypeError(f"{cls.__name__}: {msg_type.__name__} names unknown lane {lane!r}")
    return handlers, lane_of


class Room(Generic[C]):
    """Handlers of some of an actor's messages, kept in a module of their own.

    ``C`` is what a handler is given as its first argument: the actor, seen
    through the narrow interface the room needs (a Protocol), so that the
    room's module does not import the actor's."""

    def __init__(self, name: str, *, lane: str | None = None) -> None:
        self.name = name
        self.lane = lane
        self.handlers: dict[type, Handler] = {}

    def handles(
        self, msg_type: type[Message[R]]
    ) -> Callable[[Callable[[C, M], Awaitable[R]]], Callable[[C, M], Awaitable[R]]]:
        """Register ``fn(context, msg)`` as the handler of ``msg_type``."""

        def register(fn: Callable[[C, M], Awaitable[R]]) -> Callable[[C, M], Awaitable[R]]:
            if msg_type in self.handlers:
                raise TypeError(f"room {self.name!r} handles {msg_type.__name__} twice")
            self.handlers[msg_type] = fn
            return fn

        return register
