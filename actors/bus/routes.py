"""Where the bus sends each envelope, and what became of it (DESIGN §5).

One batch, in stream order:

1. every ``command.requested`` in one ``IngestCommands`` (one transaction);
2. status reports (``command.started|completed|failed|cancelled``), in order
   per command, different commands side by side;
3. ``cache.invalidate`` to the cache actor.

Each envelope is judged by itself: it ends "done" (its effect is committed,
or it repeated one), "dead" (it can never succeed: a conflicting status, a
user that does not exist, data PostgreSQL refuses, any other error it meets)
or "retry" (it may succeed later: the command it reports on is not there yet).
Only a dependency that is down raises, DependencyDown for the whole batch,
which the bus retries as it is; no envelope can make the router raise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

import asyncpg
import msgspec

from actors.cache import (
    CacheDelete,
    CacheError,
    CacheInvalidatePattern,
    CacheInvalidateTags,
    CacheRef,
    CacheUnavailable,
)
from actors.data.model import CommandCreate, CommandStatusUpdate
from actors.data.repo import Conflict, Invalid, NotFound
from actors.envelope import (
    CacheInvalidate,
    CommandCancelled,
    CommandCompleted,
    CommandFailed,
    CommandRequested,
    CommandStarted,
    Envelope,
)
from actors.kernel import ActorError
from actors.persistence import IngestCommands, PersistenceRef, ReportCommand, Unavailable

__all__ = ["SHARED", "DependencyDown", "Item", "Outcome", "Router", "Sender", "describe"]

# What means "try the whole batch again later", not "this envelope is bad".
_DOWN = (ActorError, Unavailable, CacheUnavailable, OSError, asyncpg.InterfaceError)
_STATUS_CONCURRENCY = 8
_ASK_TIMEOUT = 30.0
R = TypeVar("R")


class DependencyDown(Exception):
    """PostgreSQL or the cache cannot take the batch now: retry it as it is."""


class Outcome(msgspec.Struct, frozen=True):
    kind: Literal["done", "dead", "retry"]
    reason: str = ""


class Sender(msgspec.Struct, frozen=True):
    """Who sent an envelope, as the daemon knows it from where it arrived
    (never from what it says): ``agent:<name>`` with the agent's user id for
    an agent's own inbox, ``inbox`` (no user) for the shared inbox."""

    label: str
    user_id: int | None = None


SHARED = Sender("inbox")
Item = tuple[str, Envelope, Sender]


DONE = Outcome("done")


class Router:
    def __init__(self, persistence: PersistenceRef, cache: CacheRef) -> None:
        self.persistence = persistence
        self.cache = cache

    async def route(self, items: list[Item]) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        requested = [item for item in items if isinstance(item[1], CommandRequested)]
        if requested:
            out.update(await self._requested(requested))
        groups: dict[tuple[str, str], list[Item]] = {}
        for key, env, sender in items:
            if isinstance(
                env, CommandStarted | CommandCompleted | CommandFailed | CommandCancelled
            ):
                ref = env.data.request_id or f"#{env.data.command_id}"
                groups.setdefault((sender.label, ref), []).append((key, env, sender))
        if groups:
            out.update(await self._statuses(list(groups.values())))
        for key, env, _sender in items:
            if isinstance(env, CacheInvalidate):
                out[key] = await self._invalidate(env)
        return out

    @staticmethod
    async def _ask(who: str, reply: Awaitable[R]) -> R:
        """The reply of an ask; an outage of the actor or what it owns is DependencyDown."""
        try:
            return await reply
        except _DOWN as exc:
            raise DependencyDown(f"{who}: {describe(exc)}") from exc

    # -- command.requested ------------------------------------------------------------------
    async def _requested(self, items: list[Item]) -> dict[str, Outcome]:
        rows = tuple(
            (_command(env), env.user_id, sender.user_id, sender.label)
            for _k, env, sender in items
            if isinstance(env, CommandRequested)
        )
        try:
            results = await self._ask(
                "persistence",
                self.persistence.ask(IngestCommands(rows=rows), timeout=_ASK_TIMEOUT),
            )
        except DependencyDown:
            raise
        except Exception as exc:
            if len(items) == 1:
                return {items[0][0]: _failed(exc)}
            # One row spoils the batch (a user deleted meanwhile, data the
            # parser let through): halve until it is alone; the others go in.
            half = len(items) // 2
            parts = await self._requested(items[:half])
            parts.update(await self._requested(items[half:]))
            return parts
        out: dict[str, Outcome] = {}
        for (key, env, _sender), done in zip(items, results, strict=True):
            if done.outcome == "no_user":
                out[key] = Outcome("dead", f"no user {env.user_id}")
            elif done.outcome == "conflict":
                out[key] = Outcome(
                    "dead",
                    f"conflict: requestId {done.request_id!r} is used by another of your commands",
                )
            else:
                out[key] = DONE
        return out

    # -- status reports -----------------------------------------------------------------------
    async def _statuses(self, groups: list[list[Item]]) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        gate = asyncio.Semaphore(_STATUS_CONCURRENCY)

        async def one_group(group: list[Item]) -> None:
            async with gate:
                for key, env, sender in group:
                    out[key] = await self._status(env, sender)

        await asyncio.gather(*(one_group(g) for g in groups))
        return out

    async def _status(self, env: Any, sender: Sender) -> Outcome:
        data = env.data
        duration = None
        if isinstance(env, CommandStarted):
            change = CommandStatusUpdate(status="running")
        elif isinstance(env, CommandCompleted):
            change = CommandStatusUpdate(status="succeeded", result=data.result)
            duration = data.duration_ms
        elif isinstance(env, CommandFailed):
            change = CommandStatusUpdate(status="failed", result=data.result, error=data.error)
            duration = data.duration_ms
        else:
            change = CommandStatusUpdate(status="cancelled", reason=data.reason)
        msg = ReportCommand(
            change=change,
            command_id=data.command_id,
            request_id=data.request_id,
            duration_ms=duration,
            actor_name=sender.label,
            actor_id=sender.user_id,
            sender=sender.label,
        )
        try:
            await self._ask("persistence", self.persistence.ask(msg, timeout=_ASK_TIMEOUT))
        except DependencyDown:
            raise
        except Exception as exc:
            return _failed(exc)
        return DONE

    # -- cache.invalidate ----------------------------------------------------------------------
    async def _invalidate(self, env: CacheInvalidate) -> Outcome:
        d = env.data
        try:
            cache, wait = self.cache, _ASK_TIMEOUT
            if d.keys:
                delete = CacheDelete(d.namespace, tuple(d.keys))
                await self._ask("cache", cache.ask(delete, timeout=wait))
            if d.tags:
                tags = CacheInvalidateTags(d.namespace, tuple(d.tags))
                await self._ask("cache", cache.ask(tags, timeout=wait))
            if d.pattern is not None:
                pattern = CacheInvalidatePattern(d.namespace, d.pattern)
                await self._ask("cache", cache.ask(pattern, timeout=wait))
        except DependencyDown:
            raise
        except CacheError as exc:
            return Outcome("dead", f"invalid: {exc}")
        except Exception as exc:
            return _failed(exc)
        return DONE


def _command(env: CommandRequested) -> CommandCreate:
    d = env.data
    return CommandCreate(
        action=d.action,
        type=d.type,
        request_id=env.request_id,
        source=env.source,
        parameters=d.parameters,
        description=d.description,
        risk_score=d.risk_score,
    )


def _failed(exc: Exception) -> Outcome:
    """One envelope's error is its own outcome: final at once, with the true
    reason, except for what may succeed on a later delivery (a command not
    committed yet, a transaction PostgreSQL rolled back to break a deadlock)."""
    if isinstance(exc, NotFound):  # the command may not be committed yet
        return Outcome("retry", f"not found: {exc}")
    if isinstance(exc, asyncpg.exceptions.TransactionRollbackError):
        return Outcome("retry", describe(exc))
    if isinstance(exc, Conflict):
        return Outcome("dead", f"conflict: {exc}")
    if isinstance(exc, Invalid | asyncpg.DataError | ValueError):
        return Outcome("dead", f"invalid: {describe(exc)}")
    return Outcome("dead", f"refused: {describe(exc)}")


def describe(exc: BaseException) -> str:
    """An error in one line, without the values it was about: PostgreSQL's
    DETAIL (``Failing row contains …``) holds the row's data, which has no
    place in a log or a dead letter's reason."""
    if isinstance(exc, asyncpg.PostgresError):
        message = exc.args[0] if exc.args else ""
        return f"{type(exc).__name__} ({exc.sqlstate}): {message}"[:500]
    return f"{type(exc).__name__}: {exc}"[:500]
