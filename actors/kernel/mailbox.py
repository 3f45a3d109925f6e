"""An actor's mailboxes: the main one and its lanes, each bounded.

Letters are the messages with, for an ask, the future of the reply. Putting
a letter never grows a queue past its bound: the caller either waits for
room or is told MailboxFull.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, TypeVar

from actors.kernel.errors import ActorError, AskTimeout, MailboxFull

__all__ = ["Lane", "Letter", "Mailboxes"]

R = TypeVar("R")


@dataclass(slots=True, eq=False)
class Letter:
    msg: Any
    reply: asyncio.Future[Any] | None

    def wanted(self) -> bool:
        """False once the asker has given up (timed out, cancelled)."""
        return self.reply is None or not self.reply.done()


@dataclass(slots=True, eq=False)
class Lane:
    name: str
    size: int
    concurrency: int
    batch_max: int
    queue: asyncio.Queue[Letter] = field(init=False)

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.size)


def _expire(reply: asyncio.Future[Any], actor: str, timeout: float) -> None:
    if not reply.done():
        reply.set_exception(AskTimeout(actor, timeout))


class Mailboxes:
    def __init__(self, owner: str, lanes: list[Lane]) -> None:
        self.owner = owner
        self.lanes = {lane.name: lane for lane in lanes}

    @property
    def depth(self) -> int:
        return sum(lane.queue.qsize() for lane in self.lanes.values())

    async def tell(self, lane: Lane, msg: Any) -> None:
        await lane.queue.put(Letter(msg, None))

    def tell_nowait(self, lane: Lane, msg: Any) -> None:
        try:
            lane.queue.put_nowait(Letter(msg, None))
        except asyncio.QueueFull:
            raise MailboxFull(self.owner, lane.size) from None

    async def ask(self, lane: Lane, msg: Any, timeout: float | None, *, wait: bool) -> Any:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        letter = Letter(msg, reply)
        try:
            lane.queue.put_nowait(letter)
        except asyncio.QueueFull:
            if not wait:
                raise MailboxFull(self.owner, lane.size) from None
            return await self._ask_when_room(lane, letter, reply, timeout)
        # The common case, kept cheap: a timer on the reply, not a timeout scope.
        timer = (
            None
            if timeout is None
            else loop.call_later(timeout, _expire, reply, self.owner, timeout)
        )
        try:
            return await reply
        finally:
            if timer is not None:
                timer.cancel()
            if not reply.done():
                reply.cancel()  # the asker has gone: the worker skips the letter

    async def _ask_when_room(
        self, lane: Lane, letter: Letter, reply: asyncio.Future[Any], timeout: float | None
    ) -> Any:
        """A full mailbox: wait for room, then for the reply, all within ``timeout``."""
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await lane.queue.put(letter)
                return await reply
        except TimeoutError:
            if not deadline.expired():
                raise  # the handler's own TimeoutError, passed on as it is
            raise AskTimeout(self.owner, timeout or 0.0) from None
        finally:
            if not reply.done():
                reply.cancel()

    def fail_asks(self, error: ActorError) -> int:
        """Fail every queued ask with ``error``; keep the queued tells, in
        order. Returns how many tells were kept."""
        kept_total = 0
        for lane in self.lanes.values():
            kept: list[Letter] = []
            while True:
                try:
                    letter = lane.queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                lane.queue.task_done()
                if letter.reply is None:
                    kept.append(letter)
                elif not letter.reply.done():
                    letter.reply.set_exception(error)
            for letter in kept:  # synchronous: no producer can take the room meanwhile
                lane.queue.put_nowait(letter)
            kept_total += len(kept)
        return kept_total

    def discard(self) -> None:
        """Empty every queue (what is left when the actor has stopped)."""
        for lane in self.lanes.values():
            while not lane.queue.empty():
                lane.queue.get_nowait()
                lane.queue.task_done()

    async def join(self) -> None:
        """Until every letter queued so far has been handled."""
        for lane in self.lanes.values():
            await lane.queue.join()
