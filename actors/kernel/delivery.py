"""How a worker serves a lane: one letter at a time, or in batches.

Kept apart from the actor's lifecycle; the rules are the failure contract in
``actor``: an ask's failure goes to its asker, a tell's failure is returned
to the worker, which raises it (the actor's crash) once every letter in hand
has been answered.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from actors.kernel.errors import ActorStopped
from actors.kernel.mailbox import Lane, Letter

if TYPE_CHECKING:
    from actors.kernel.actor import Actor

__all__ = ["serve"]


async def serve(actor: Actor, lane: Lane, task: asyncio.Task[None]) -> None:
    """The worker loop of ``lane``; returns when the actor halts."""
    queue = lane.queue
    handlers = actor._handlers
    while not actor.halting():
        letters = [await queue.get()]
        actor._busy.add(task)
        while len(letters) < lane.batch_max:
            try:
                letters.append(queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        try:
            failure = (
                await deliver(actor, letters[0])
                if len(letters) == 1 and type(letters[0].msg) in handlers
                else await deliver_many(actor, letters)
            )
        finally:
            actor._busy.discard(task)
            for _ in letters:
                queue.task_done()
        if failure is not None:
            raise failure  # a failing tell: the actor's crash


async def deliver(actor: Actor, letter: Letter) -> BaseException | None:
    """Handle one letter; returns the exception of a failing tell."""
    reply = letter.reply
    if reply is not None and reply.done():
        return None  # the asker timed out or was cancelled; nobody wants the answer
    handler = actor._handlers[type(letter.msg)]
    try:
        result = await handler(actor, letter.msg)
    except asyncio.CancelledError:
        # Cancelled past the stop deadline: the asker must not wait for its own timeout.
        if reply is not None and not reply.done():
            reply.set_exception(ActorStopped(actor.name))
        raise
    except Exception as exc:
        return _failed(actor, letter, exc)
    actor.stats.processed += 1
    if reply is not None and not reply.done():
        reply.set_result(result)
    return None


def _failed(actor: Actor, letter: Letter, exc: Exception) -> BaseException | None:
    if letter.reply is None:
        actor.log.error("tell_failed", message=type(letter.msg).__name__, error=repr(exc))
        return exc
    actor.stats.ask_errors += 1
    if not letter.reply.done():
        letter.reply.set_exception(exc)
    return None


async def deliver_many(actor: Actor, letters: list[Letter]) -> BaseException | None:
    """Letters with a handler of their own one by one, then the batched ones
    in one ``handle_batch``; returns the first failing tell's exception."""
    failure: BaseException | None = None
    batch: list[Letter] = []
    for letter in letters:
        if type(letter.msg) in actor._handlers:
            failure = failure or await deliver(actor, letter)
        elif letter.wanted():
            batch.append(letter)
    if not batch:
        return failure
    try:
        results = await actor.handle_batch([lt.msg for lt in batch])
        if len(results) != len(batch):
            raise RuntimeError(
                f"{actor.name}: handle_batch returned {len(results)} results for {len(batch)}"
            )
    except asyncio.CancelledError:
        for lt in batch:
            if lt.reply is not None and not lt.reply.done():
                lt.reply.set_exception(ActorStopped(actor.name))
        raise
    except Exception as exc:  # the whole batch failed: each letter fails with it
        results = [exc] * len(batch)
    for lt, result in zip(batch, results, strict=True):
        if isinstance(result, Exception):
            failure = failure or _failed(actor, lt, result)
            continue
        actor.stats.processed += 1
        if lt.reply is not None and not lt.reply.done():
            lt.reply.set_result(result)
    return failure
