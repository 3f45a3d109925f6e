"""Where the bus sends each envelope, and what became of it (DESIGN §5).

One batch, in stream order:

1. every ``command.requested`` in one ``IngestCommands`` (one transaction);
2. status reports (``command.started|completed|failed|cancelled``), in order
   per command, different commands side by side;
3. ``cache.invalidate`` to the cache actor.

Each envelope ends "done" (its effect is committed, or it repeated one),
"dead" (it can never succeed: a conflicting status, a user that does not
exist, data PostgreSQL refuses) or "retry" (it may succeed later: the command
it reports on is not there yet). A dependency that is down raises
DependencyDown for the whole batch, which the bus retries as it is.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import asyncpg
import msgspec

from actors.cache import (
    CacheDelete,
    CacheError,
    CacheInvalidatePattern,
    CacheInvalidateTags,
    CacheUnavailable,
)
from actors.data import messages as m
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
from actors.kernel import Actor, ActorError
from actors.persistence import Unavailable

__all__ = ["DependencyDown", "Outcome", "Router"]

# What means "try the whole batch again later", not "this envelope is bad".
_DOWN = (ActorError, Unavailable, CacheUnavailable, OSError, asyncpg.InterfaceError)
_STATUS_CONCURRENCY = 8
_ASK_TIMEOUT = 30.0


class DependencyDown(Exception):
    """PostgreSQL or the cache cannot take the batch now: retry it as it is."""


class Outcome(msgspec.Struct, frozen=True):
    kind: Literal["done", "dead", "retry"]
    reason: str = ""


DONE = Outcome("done")


class Router:
    def __init__(self, persistence: Actor, cache: Actor) -> None:
        self.persistence = persistence
        self.cache = cache

    async def route(self, items: list[tuple[str, Envelope]]) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        requested = [(k, e) for k, e in items if isinstance(e, CommandRequested)]
        if requested:
            out.update(await self._requested(requested))
        groups: dict[str, list[tuple[str, Envelope]]] = {}
        for key, env in items:
            if isinstance(
                env, CommandStarted | CommandCompleted | CommandFailed | CommandCancelled
            ):
                ref = env.data.request_id or f"#{env.data.command_id}"
                groups.setdefault(ref, []).append((key, env))
        if groups:
            out.update(await self._statuses(list(groups.values())))
        for key, env in items:
            if isinstance(env, CacheInvalidate):
                out[key] = await self._invalidate(env)
        return out

    async def _ask(self, actor: Actor, msg: Any) -> Any:
        try:
            return await actor.ask(msg, timeout=_ASK_TIMEOUT)
        except _DOWN as exc:
            raise DependencyDown(f"{actor.name}: {type(exc).__name__}: {exc}") from exc

    # -- command.requested ------------------------------------------------------------------
    async def _requested(self, items: list[tuple[str, Any]]) -> dict[str, Outcome]:
        rows = tuple((_command(env), env.user_id) for _k, env in items)
        try:
            results = await self._ask(self.persistence, m.IngestCommands(rows=rows))
        except DependencyDown:
            raise
        except Exception:
            if len(items) == 1:
                raise
            # One row spoils the batch (data PostgreSQL refuses, a user deleted
            # meanwhile): find it, keep the others.
            out: dict[str, Outcome] = {}
            for item in items:
                try:
                    out.update(await self._requested([item]))
                except DependencyDown:
                    raise
                except Exception as exc:
                    out[item[0]] = _failed(exc)
            return out
        out = {}
        for (key, env), done in zip(items, results, strict=True):
            if done.outcome == "no_user":
                out[key] = Outcome("dead", f"no user {env.user_id}")
            elif done.outcome == "conflict":
                out[key] = Outcome(
                    "dead", f"conflict: requestId {done.request_id!r} is used by another command"
                )
            else:
                out[key] = DONE
        return out

    # -- status reports -----------------------------------------------------------------------
    async def _statuses(self, groups: list[list[tuple[str, Any]]]) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        gate = asyncio.Semaphore(_STATUS_CONCURRENCY)

        async def one_group(group: list[tuple[str, Any]]) -> None:
            async with gate:
                for key, env in group:
                    out[key] = await self._status(env)

        await asyncio.gather(*(one_group(g) for g in groups))
        return out

    async def _status(self, env: Any) -> Outcome:
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
        msg = m.ReportCommand(
            change=change,
            command_id=data.command_id,
            request_id=data.request_id,
            duration_ms=duration,
            actor_name=f"bus:{env.source}"[:100],
        )
        try:
            await self._ask(self.persistence, msg)
        except DependencyDown:
            raise
        except Exception as exc:
            return _failed(exc)
        return DONE

    # -- cache.invalidate ----------------------------------------------------------------------
    async def _invalidate(self, env: CacheInvalidate) -> Outcome:
        d = env.data
        try:
            if d.keys:
                await self._ask(self.cache, CacheDelete(d.namespace, tuple(d.keys)))
            if d.tags:
                await self._ask(self.cache, CacheInvalidateTags(d.namespace, tuple(d.tags)))
            if d.pattern is not None:
                await self._ask(self.cache, CacheInvalidatePattern(d.namespace, d.pattern))
        except DependencyDown:
            raise
        except CacheError as exc:
            return Outcome("dead", f"invalid: {exc}")
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
    """A handler's error: final for what can never succeed, else retried."""
    if isinstance(exc, NotFound):  # the command may not be committed yet
        return Outcome("retry", f"not found: {exc}")
    if isinstance(exc, Conflict):
        return Outcome("dead", f"conflict: {exc}")
    if isinstance(exc, Invalid | asyncpg.DataError | ValueError):
        return Outcome("dead", f"invalid: {exc}")
    return Outcome("retry", f"{type(exc).__name__}: {exc}")
