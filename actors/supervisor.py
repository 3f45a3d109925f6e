"""The supervisor: ordered start, reverse stop, restarts with a budget (DESIGN §2).

A crashed actor is restarted after a jittered exponential backoff. More than
``max_restarts`` restarts of one actor within ``restart_window`` seconds, or a
FatalActorError, escalates: the supervisor sets ``escalated`` and the daemon
exits non-zero so systemd (Restart=on-failure) takes over.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import Any

import structlog

from actors.kernel import Actor, ActorState, FatalActorError
from config import SupervisorSettings

__all__ = ["Escalation", "Supervisor"]

log = structlog.get_logger("jarvisd", actor="supervisor")  # lazy: follows configure()


class Escalation(Exception):
    """The restart budget is spent, or a failure no restart can fix."""


class Supervisor:
    def __init__(self, actors: list[Actor], settings: SupervisorSettings | None = None) -> None:
        names = [a.name for a in actors]
        if len(set(names)) != len(names):
            raise ValueError(f"actor names must be unique: {names}")
        self.actors = list(actors)
        self.settings = settings or SupervisorSettings()
        self.escalated = asyncio.Event()
        self.escalation: Escalation | None = None
        self._history: dict[str, deque[float]] = {a.name: deque() for a in actors}
        self._restart_tasks: set[asyncio.Task[None]] = set()
        self._started: list[Actor] = []
        self._stopping = False

    def add(self, actor: Actor) -> None:
        """One more actor, started after (and stopped before) the others."""
        if self._started or self.escalated.is_set():
            raise RuntimeError("actors are added before the supervisor starts")
        if any(a.name == actor.name for a in self.actors):
            raise ValueError(f"actor names must be unique: {actor.name}")
        self.actors.append(actor)
        self._history[actor.name] = deque()

    def get(self, name: str) -> Actor:
        for actor in self.actors:
            if actor.name == name:
                return actor
        raise KeyError(name)

    # -- start -------------------------------------------------------------------
    async def start(self) -> None:
        """Start every actor in order; an actor that fails to start is retried
        within the restart budget before the next one starts. Actors next to
        each other that need no other actor (``independent``: the embedded
        servers) start side by side."""
        pending = list(self.actors)
        while pending and not self._stopping:
            group = [pending.pop(0)]
            while group[0].independent and pending and pending[0].independent:
                group.append(pending.pop(0))
            for actor in group:
                actor.set_crash_callback(self._on_crash)
            results = await asyncio.gather(
                *(self._start_with_retries(actor) for actor in group), return_exceptions=True
            )
            failed = None
            for actor, result in zip(group, results, strict=True):
                if isinstance(result, BaseException):
                    failed = failed or result
                else:
                    self._started.append(actor)  # stopped again by stop()
            if failed is not None:
                raise failed

    async def _start_with_retries(self, actor: Actor) -> None:
        while True:
            try:
                await actor.start()
                return
            except FatalActorError as exc:
                self._escalate(f"actor {actor.name!r} cannot start: {exc}")
                raise self.escalation from exc  # type: ignore[misc]
            except Exception as exc:
                log.error(
                    "actor_start_failed", target=actor.name, error=f"{type(exc).__name__}: {exc}"
                )
                actor._state = ActorState.RESTARTING
                delay = self._budget(actor)
                if delay is None:
                    raise self.escalation from exc  # type: ignore[misc]
                await asyncio.sleep(delay)

    # -- restarts ----------------------------------------------------------------
    def _budget(self, actor: Actor) -> float | None:
        """Record a restart and return its backoff delay, or escalate and return None."""
        s = self.settings
        now = time.monotonic()
        history = self._history[actor.name]
        while history and now - history[0] > s.restart_window:
            history.popleft()
        if len(history) >= s.max_restarts:
            self._escalate(
                f"actor {actor.name!r} needed more than {s.max_restarts} restarts "
                f"in {s.restart_window:g}s (last: {actor.health().detail})"
            )
            return None
        history.append(now)
        base: float = min(s.backoff_max, s.backoff_initial * (2 ** (len(history) - 1)))
        return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto

    def _on_crash(self, actor: Actor, exc: BaseException) -> None:
        if self._stopping:
            return
        if isinstance(exc, FatalActorError):
            self._escalate(f"actor {actor.name!r} failed: {exc}")
            return
        delay = self._budget(actor)
        if delay is None:
            return
        log.warning("actor_restart_scheduled", target=actor.name, delay=round(delay, 3))
        task = asyncio.get_running_loop().create_task(
            self._restart(actor, delay), name=f"restart:{actor.name}"
        )
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)

    async def _restart(self, actor: Actor, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._stopping:
            return
        try:
            await actor.start()
        except FatalActorError as exc:
            self._escalate(f"actor {actor.name!r} cannot restart: {exc}")
            return
        except Exception as exc:
            log.error(
                "actor_restart_failed", target=actor.name, error=f"{type(exc).__name__}: {exc}"
            )
            actor._state = ActorState.RESTARTING
            self._on_crash(actor, exc)
            return
        log.info("actor_restarted", target=actor.name, restarts=actor.stats.restarts)

    def _escalate(self, reason: str) -> None:
        if self.escalation is None:
            self.escalation = Escalation(reason)
            log.critical("supervisor_escalation", reason=reason)
        self.escalated.set()

    # -- stop --------------------------------------------------------------------
    async def stop(self, timeout: float) -> dict[str, Any]:
        """Stop actors in reverse start order under one shared drain deadline.

        Each actor drains for what is left of the deadline (at least a short
        slice so it can still close cleanly). Returns a summary for the log."""
        self._stopping = True
        for task in list(self._restart_tasks):
            task.cancel()
        if self._restart_tasks:
            await asyncio.gather(*self._restart_tasks, return_exceptions=True)
        deadline = time.monotonic() + timeout
        errors: list[str] = []
        dropped = 0
        # Actors that never finished starting still get stopped: they may hold
        # half-acquired resources (a child process, a pool).
        order = [a for a in self.actors if a in self._started or a.state is not ActorState.NEW]
        for actor in reversed(order):
            remaining = max(deadline - time.monotonic(), 0.2)
            try:
                await actor.stop(timeout=remaining)
            except Exception as exc:
                errors.append(f"{actor.name}: {type(exc).__name__}: {exc}")
            dropped += actor.stats.dropped_on_stop
        return {"actors": len(order), "errors": errors, "dropped": dropped}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {a.name: a.snapshot() for a in self.actors}
