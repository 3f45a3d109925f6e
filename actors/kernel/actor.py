"""The actor: a bounded mailbox, workers that serve it, a lifecycle (DESIGN §2).

Failure contract, the same for every kind of actor (one worker or many,
one message at a time or in batches, main mailbox or a lane):

- an exception raised while handling an ask goes back to the asker; the
  actor keeps running;
- an exception raised while handling a tell, from ``run()``, or from any task
  the actor ``spawn``-ed is a crash: the actor stops taking mail, lets the
  messages in hand finish, fails every ask still queued with ActorDead, keeps
  the queued tells (they were accepted), and reports to its supervisor, which
  restarts it after a backoff or escalates. A handler that is told messages
  therefore owns the failures it expects (a server that is down, say) and
  raises only what is a bug;
- a failing health probe is a health result, never a crash.

Overflow policy of every mailbox: ``tell`` and ``ask`` wait for room
(backpressure, inside the actors), ``tell_nowait`` and ``ask_nowait`` raise
MailboxFull at once: the HTTP edge sends only these, and answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

import structlog

from actors.kernel.delivery import serve
from actors.kernel.errors import ActorDead, ActorStopped, UnknownMessage
from actors.kernel.health import Health, HealthLoop
from actors.kernel.mailbox import Lane, Mailboxes
from actors.kernel.messages import Handler, LaneSpec, Message, Room, handler_table

__all__ = ["MAIN_LANE", "Actor", "ActorState", "ActorStats"]

R = TypeVar("R")
MAIN_LANE = "main"


class ActorState(StrEnum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(slots=True)
class ActorStats:
    processed: int = 0
    ask_errors: int = 0
    crashes: int = 0
    restarts: int = 0
    dropped_on_stop: int = 0


CrashCallback = Callable[["Actor", BaseException], None]


class Actor:
    """Base class: subclass, add ``@handles(Msg)`` methods or ``rooms``, and
    optionally override ``on_start``/``on_stop``/``run``/``check``."""

    _handlers: ClassVar[dict[type, Handler]] = {}
    _lane_of: ClassVar[dict[type, str]] = {}
    # Modules of messages and their handlers (kernel.messages.Room).
    rooms: ClassVar[tuple[Room[Any], ...]] = ()
    # Mailboxes beside the main one, named by the rooms that use them.
    lanes: ClassVar[dict[str, LaneSpec]] = {}
    # With batch_max > 1: the messages of the main mailbox handed, several at
    # once, to handle_batch (one network round trip for all of them).
    batched: ClassVar[tuple[type, ...]] = ()
    batch_max: ClassVar[int] = 1
    # Upper bound for on_stop; connections must close even after a long drain.
    stop_hook_timeout: ClassVar[float] = 15.0
    # Needs no other actor to start: the supervisor may start it beside its neighbours.
    independent: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers, cls._lane_of = handler_table(cls, MAIN_LANE)

    def __init__(
        self,
        name: str,
        *,
        mailbox_size: int = 1000,
        concurrency: int = 1,
        health_interval: float = 2.0,
    ) -> None:
        if mailbox_size < 1 or concurrency < 1:
            raise ValueError("mailbox_size and concurrency must be >= 1")
        self.name = name
        self.mailbox_size = mailbox_size
        self.concurrency = concurrency
        self.stats = ActorStats()
        self.log = structlog.get_logger("jarvisd", actor=name)
        self.mailboxes = Mailboxes(
            name,
            [
                Lane(MAIN_LANE, mailbox_size, concurrency, self.batch_max),
                *(Lane(n, s.mailbox_size, s.concurrency, 1) for n, s in self.lanes.items()),
            ],
        )
        self._health = HealthLoop(self.check, health_interval)
        self._state = ActorState.NEW
        self._accepting = False
        self._workers: set[asyncio.Task[None]] = set()
        self._busy: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._halting = False
        self._last_crash: str = ""
        self._early_crash: BaseException | None = None
        self._on_crash: CrashCallback | None = None
        self._crash_task: asyncio.Task[None] | None = None

    # -- hooks -----------------------------------------------------------------
    async def on_start(self) -> None:
        """Acquire resources. Raising here counts as a crash (or escalates if Fatal)."""

    async def on_stop(self) -> None:
        """Release resources; called after the mailbox is drained or on a crash."""

    async def run(self) -> None:
        """Optional background body; raising from it is a crash."""

    async def handle_batch(self, msgs: list[Any]) -> list[Any]:
        """With ``batch_max > 1``: handle several ``batched`` messages at once and
        return one result per message, in order; an Exception instance in the
        list is that message's failure (raised in its asker; a crash for a tell)."""
        raise NotImplementedError

    async def check(self) -> Health | None:
        """Probe the actor's dependency (e.g. SELECT 1); None means no probe.
        Called every ``health_interval`` seconds; ``health()`` serves the cached result."""
        return None

    # -- introspection ---------------------------------------------------------
    @property
    def state(self) -> ActorState:
        return self._state

    @property
    def health_interval(self) -> float:
        return self._health.interval

    @health_interval.setter
    def health_interval(self, value: float) -> None:
        self._health.interval = value

    def halting(self) -> bool:
        """True once the actor is stopping or crashed: loops in ``run()`` check it
        (cancellation alone may be swallowed by a library on Python 3.11)."""
        return self._halting

    @property
    def mailbox_depth(self) -> int:
        return self.mailboxes.depth

    def health(self) -> Health:
        """Non-blocking: the state and the last cached check."""
        if self._state is not ActorState.RUNNING:
            detail = f"actor {self._state.value}"
            if self._last_crash:
                detail += f" (last crash: {self._last_crash})"
            return Health(status="fail", detail=detail, checked_at=time.time())
        if self._health.last is not None:
            return self._health.last
        return Health(status="pass", detail="running", checked_at=time.time())

    async def refresh_health(self) -> Health:
        """Run the check now (right after a change, and in tests); returns health()."""
        await self._health.probe_once()
        return self.health()

    # -- messaging -------------------------------------------------------------
    def _lane(self, msg: Any, *, telling: bool) -> Lane:
        lane = self._lane_of.get(type(msg))
        if lane is None:
            raise UnknownMessage(f"actor {self.name!r} has no handler for {type(msg).__name__}")
        # Tells are also taken while the actor restarts after a crash: they
        # wait in the mailbox for the new instance. Asks fail at once.
        if not self._accepting and not (telling and self._state is ActorState.RESTARTING):
            if self._state is ActorState.RESTARTING:
                raise ActorDead(self.name, self._last_crash)
            raise ActorStopped(self.name)
        return self.mailboxes.lanes[lane]

    async def tell(self, msg: Message[Any]) -> None:
        """Queue a message, waiting for room in the mailbox (backpressure)."""
        await self.mailboxes.tell(self._lane(msg, telling=True), msg)

    def tell_nowait(self, msg: Message[Any]) -> None:
        """Queue a message or raise MailboxFull at once."""
        self.mailboxes.tell_nowait(self._lane(msg, telling=True), msg)

    async def ask(self, msg: Message[R], timeout: float | None = None) -> R:
        """Send a message and return the handler's reply, or raise its exception.
        A full mailbox is waited for; ``timeout`` bounds the whole wait
        (queueing included) and raises AskTimeout."""
        reply: R = await self.mailboxes.ask(self._lane(msg, telling=False), msg, timeout, wait=True)
        return reply

    async def ask_nowait(self, msg: Message[R], timeout: float | None = None) -> R:
        """As ``ask``, but a full mailbox raises MailboxFull at once."""
        reply: R = await self.mailboxes.ask(
            self._lane(msg, telling=False), msg, timeout, wait=False
        )
        return reply

    # -- owned tasks -----------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of this actor's: cancelled when the actor
        stops or crashes, and its exception, if any, is the actor's crash."""
        if self._halting:
            coro.close()
            raise ActorStopped(self.name)
        return self._track(self._background, coro, f"{self.name}.{name}")

    def _track(self, bag: set[asyncio.Task[Any]], coro: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro, name=name)
        bag.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._workers.discard(task)
        self._background.discard(task)
        self._busy.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._crashed(exc)

    # -- lifecycle (driven by the supervisor; usable alone in tests) -------------
    def set_crash_callback(self, callback: CrashCallback | None) -> None:
        self._on_crash = callback

    async def start(self) -> None:
        """Run on_start, then the workers, the background body and the health loop."""
        if self._state not in (ActorState.NEW, ActorState.RESTARTING, ActorState.FAILED):
            raise RuntimeError(f"actor {self.name!r} cannot start from state {self._state}")
        restarting = self._state is not ActorState.NEW
        self._state = ActorState.STARTING if not restarting else ActorState.RESTARTING
        self._halting = False
        self._early_crash = None
        self._health.last = None
        try:
            with structlog.contextvars.bound_contextvars(actor=self.name):
                await self.on_start()
            if self._early_crash is not None:  # a task spawned by on_start died already
                raise self._early_crash
        except BaseException:
            await self._halt(deadline=0.0)
            raise
        if restarting:
            self.stats.restarts += 1
        for lane in self.mailboxes.lanes.values():
            for i in range(lane.concurrency):
                self._track(self._workers, self._worker(lane), f"{self.name}.{lane.name}{i}")
        self._track(self._background, self._run_body(), f"{self.name}.run")
        self._track(self._background, self._health_body(), f"{self.name}.health")
        self._accepting = True
        self._state = ActorState.RUNNING

    async def _run_body(self) -> None:
        structlog.contextvars.bind_contextvars(actor=self.name)
        await self.run()

    async def _health_body(self) -> None:
        structlog.contextvars.bind_contextvars(actor=self.name)
        await self._health.run(self.halting)

    async def _worker(self, lane: Lane) -> None:
        structlog.contextvars.bind_contextvars(actor=self.name)
        task = asyncio.current_task()
        assert task is not None
        await serve(self, lane, task)

    # -- crash -------------------------------------------------------------------
    def _crashed(self, exc: BaseException) -> None:
        if self._state is ActorState.STARTING or (
            self._state is ActorState.RESTARTING and not self._accepting and not self._halting
        ):
            self._early_crash = self._early_crash or exc  # start() raises it
            return
        if self._state is not ActorState.RUNNING:
            return  # already handling a crash, or stopping
        self.stats.crashes += 1
        self._last_crash = f"{type(exc).__name__}: {exc}"
        self._state = ActorState.RESTARTING
        self._accepting = False
        self.log.error("actor_crashed", error=self._last_crash, exc_info=exc)
        self.mailboxes.fail_asks(ActorDead(self.name, self._last_crash))
        self._crash_task = asyncio.get_running_loop().create_task(
            self._after_crash(exc), name=f"{self.name}.crash"
        )
        self._crash_task.add_done_callback(self._crash_handled)

    def _crash_handled(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Not even a restart could be arranged: said, never silent.
            self.log.critical("actor_crash_unhandled", error=repr(task.exception()))

    async def _after_crash(self, exc: BaseException) -> None:
        await self._halt(deadline=self.stop_hook_timeout)
        await self._run_stop_hook()
        if self._on_crash is not None:
            self._on_crash(self, exc)
        else:
            self._state = ActorState.FAILED

    async def _halt(self, deadline: float) -> None:
        """Stop the workers: idle ones at once, busy ones after their message or the deadline."""
        self._halting = True
        for task in list(self._background):
            task.cancel()
        for task in list(self._workers):
            if task not in self._busy:
                task.cancel()
        pending = set(self._workers) | set(self._background)
        if pending:
            _done, still = await asyncio.wait(pending, timeout=deadline)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)
        self._workers.clear()
        self._background.clear()

    async def _run_stop_hook(self) -> None:
        try:
            with structlog.contextvars.bound_contextvars(actor=self.name):
                async with asyncio.timeout(self.stop_hook_timeout):
                    await self.on_stop()
        except Exception as exc:
            self.log.warning("on_stop_failed", error=repr(exc))

    # -- stop --------------------------------------------------------------------
    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, drain the mailboxes up to ``timeout``, cancel the rest,
        fail the asks left, then run on_stop. Idempotent."""
        if self._state in (ActorState.STOPPED, ActorState.STOPPING):
            return
        was = self._state
        self._state = ActorState.STOPPING
        self._accepting = False
        if self._crash_task is not None and not self._crash_task.done():
            self._crash_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._crash_task
        drained = True
        if was is ActorState.RUNNING and self._workers:
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    await self.mailboxes.join()
            except TimeoutError:
                drained = False
        await self._halt(deadline=0.0 if not drained else max(timeout, 0.0))
        dropped = self.mailboxes.fail_asks(ActorStopped(self.name))
        # Tells still queued now can no longer be served: count, then discard them.
        self.mailboxes.discard()
        self.stats.dropped_on_stop += dropped
        if was in (ActorState.RUNNING, ActorState.RESTARTING, ActorState.STARTING):
            await self._run_stop_hook()
        self._state = ActorState.STOPPED
        self.log.info(
            "actor_stopped", drained=drained, dropped=dropped, processed=self.stats.processed
        )

    def snapshot(self) -> dict[str, Any]:
        """Plain data for /stats and /metrics."""
        main = self.mailboxes.lanes[MAIN_LANE]
        data: dict[str, Any] = {
            "state": self._state.value,
            "mailbox": {"depth": self.mailbox_depth, "size": main.size},
            "concurrency": self.concurrency,
            "processed": self.stats.processed,
            "askErrors": self.stats.ask_errors,
            "crashes": self.stats.crashes,
            "restarts": self.stats.restarts,
            "droppedOnStop": self.stats.dropped_on_stop,
            "health": self.health().status,
        }
        if len(self.mailboxes.lanes) > 1:
            data["lanes"] = {
                lane.name: {"depth": lane.queue.qsize(), "size": lane.size}
                for lane in self.mailboxes.lanes.values()
            }
        return data
