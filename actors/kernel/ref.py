"""Typed references: how the rest of the process reaches an actor.

Each actor module defines a reference class whose ``ask`` accepts only that
actor's messages and returns their reply types, e.g.::

    class CacheRef(Ref):
        async def ask(self, msg: CacheMessage[R], timeout: float | None = None) -> R:
            return await self._ask(msg, timeout)

so that sending a message to the wrong actor, or reading its reply as the
wrong type, is an error for mypy, and going to a message's definition leads
to the room that answers it. A reference also carries how its holder sends:
inside the daemon an ask waits for room in a full mailbox (backpressure); at
the HTTP edge (``edge=True``) it never waits: a full mailbox raises
MailboxFull at once, which HTTP answers with 503.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from actors.kernel.actor import Actor
from actors.kernel.health import Health
from actors.kernel.messages import Message

__all__ = ["Ref"]

R = TypeVar("R")


class Ref:
    def __init__(
        self,
        actor: Actor,
        *,
        timeout: float | Callable[[], float] | None = None,
        edge: bool = False,
    ) -> None:
        self.actor = actor
        self.edge = edge
        self._timeout = timeout

    @property
    def name(self) -> str:
        return self.actor.name

    def timeout(self) -> float | None:
        """The default timeout of this reference's asks (it may follow a reload)."""
        t = self._timeout
        return t() if callable(t) else t

    async def _ask(self, msg: Message[R], timeout: float | None) -> R:
        wait = self.timeout() if timeout is None else timeout
        if self.edge:
            return await self.actor.ask_nowait(msg, wait)
        return await self.actor.ask(msg, wait)

    def _tell_nowait(self, msg: Message[Any]) -> None:
        self.actor.tell_nowait(msg)

    def health(self) -> Health:
        return self.actor.health()

    def snapshot(self) -> dict[str, Any]:
        return self.actor.snapshot()

    def bind(self, *, timeout: float | Callable[[], float] | None, edge: bool) -> Any:
        """The same actor, reached with another timeout or sending policy
        (returns a reference of this reference's class)."""
        return type(self)(self.actor, timeout=timeout, edge=edge)
