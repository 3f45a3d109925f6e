"""The actor kernel (DESIGN §2).

An actor owns its state and a bounded mailbox; the rest of the process reaches
it only through ``tell`` (fire and forget, waits for room), ``tell_nowait``
(raises MailboxFull) and ``ask`` (returns the reply or raises the handler's
exception in the caller). ``concurrency`` workers serve one mailbox.

Failure contract:
- an exception raised while handling an ask goes back to the asker; the actor
  keeps running;
- an exception raised while handling a tell, or from ``run()``, is a crash
  (a failing health probe is only a failing health result): the actor stops taking mail, lets in-flight
  messages finish, fails every ask still queued with ActorDead, keeps the
  queued tells (they were accepted), and reports to its supervisor, which
  restarts it after a backoff.

Overflow policy of every mailbox: ``tell`` waits for room (backpressure),
``tell_nowait`` and ``ask_nowait`` reject with MailboxFull; callers at the edge
(HTTP) turn that into 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Literal, TypeVar

import msgspec
import structlog

__all__ = [
    "Actor",
    "ActorDead",
    "ActorError",
    "ActorState",
    "ActorStopped",
    "AskTimeout",
    "FatalActorError",
    "Health",
    "MailboxFull",
    "UnknownMessage",
    "handles",
]

HealthStatus = Literal["pass", "warn", "fail"]
Handler = Callable[[Any, Any], Awaitable[Any]]
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class ActorError(Exception):
    """Base of the kernel's own errors."""


class MailboxFull(ActorError):
    """The mailbox is at its bound and the caller asked not to wait."""

    def __init__(self, actor: str, size: int) -> None:
        super().__init__(f"mailbox of actor {actor!r} is full ({size} messages)")
        self.actor = actor


class ActorStopped(ActorError):
    """The actor is stopping or stopped and takes no more messages."""

    def __init__(self, actor: str) -> None:
        super().__init__(f"actor {actor!r} is stopped")
        self.actor = actor


class ActorDead(ActorError):
    """The actor crashed; asks pending on it fail at once instead of hanging."""

    def __init__(self, actor: str, reason: str = "") -> None:
        super().__init__(f"actor {actor!r} is down" + (f": {reason}" if reason else ""))
        self.actor = actor


class AskTimeout(ActorError, TimeoutError):
    """No reply within the ask's timeout."""

    def __init__(self, actor: str, timeout: float) -> None:
        super().__init__(f"actor {actor!r} did not answer within {timeout:g}s")
        self.actor = actor


class UnknownMessage(ActorError, TypeError):
    """The actor has no handler for this message type."""


class FatalActorError(ActorError):
    """A failure no restart can fix (missing binary, bad permissions): escalate at once."""


class ActorState(StrEnum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """One component's health as last observed (never computed on the read path)."""

    status: HealthStatus
    detail: str = ""
    observed_ms: float | None = None
    checked_at: float = 0.0  # wall clock, seconds


def handles(*types: type) -> Callable[[F], F]:
    """Mark an ``async def`` method as the handler of the given message types."""

    def mark(fn: F) -> F:
        fn.__dict__["_jarvisd_handles"] = types
        return fn

    return mark


@dataclass(slots=True, eq=False)
class _Letter:
    msg: Any
    reply: asyncio.Future[Any] | None


@dataclass(slots=True)
class ActorStats:
    processed: int = 0
    ask_errors: int = 0
    crashes: int = 0
    restarts: int = 0
    dropped_on_stop: int = 0


CrashCallback = Callable[["Actor", BaseException], None]


def _expire(reply: asyncio.Future[Any], actor: str, timeout: float) -> None:
    if not reply.done():
        reply.set_exception(AskTimeout(actor, timeout))


class Actor:
    """Base class: subclass, add ``@handles(Msg)`` methods, optionally override
    ``on_start``/``on_stop``/``run``/``check``."""

    _handlers: ClassVar[dict[type, str]] = {}
    # Upper bound for on_stop; connections must close even after a long drain.
    stop_hook_timeout: ClassVar[float] = 15.0
    # Needs no other actor to start: the supervisor may start it beside its neighbours.
    independent: ClassVar[bool] = False
    # Above 1, each worker takes up to this many queued messages at once and
    # hands them to handle_batch (one network round trip for all of them).
    batch_max: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[type, str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for msg_type in getattr(value, "_jarvisd_handles", ()):
                    handlers[msg_type] = attr
        cls._handlers = handlers

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
        self.health_interval = health_interval
        self.stats = ActorStats()
        self.log = structlog.get_logger("jarvisd", actor=name)
        self._mailbox: asyncio.Queue[_Letter] = asyncio.Queue(maxsize=mailbox_size)
        self._state = ActorState.NEW
        self._accepting = False
        self._workers: set[asyncio.Task[None]] = set()
        self._busy: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._halting = False
        self._last_check: Health | None = None
        self._last_crash: str = ""
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
        """With ``batch_max > 1``: handle several messages at once and return
        one result per message, in order; an Exception instance in the list
        is raised in that message's asker (and logged for a tell)."""
        raise NotImplementedError

    async def check(self) -> Health | None:
        """Probe the actor's dependency (e.g. SELECT 1); None means no probe.
        Called every ``health_interval`` seconds; ``health()`` serves the cached result."""
        return None

    # -- introspection ---------------------------------------------------------
    @property
    def state(self) -> ActorState:
        return self._state

    def halting(self) -> bool:
        """True once the actor is stopping or crashed: loops in ``run()`` check it
        (cancellation alone may be swallowed by a library on Python 3.11)."""
        return self._halting

    @property
    def mailbox_depth(self) -> int:
        return self._mailbox.qsize()

    def health(self) -> Health:
        """Non-blocking: the state and the last cached check."""
        if self._state is not ActorState.RUNNING:
            detail = f"actor {self._state.value}"
            if self._last_crash:
                detail += f" (last crash: {self._last_crash})"
            return Health(status="fail", detail=detail, checked_at=time.time())
        if self._last_check is not None:
            return self._last_check
        return Health(status="pass", detail="running", checked_at=time.time())

    # -- messaging -------------------------------------------------------------
    def _admit(self, msg: Any) -> None:
        if type(msg) not in self._handlers:
            raise UnknownMessage(f"actor {self.name!r} has no handler for {type(msg).__name__}")
        if not self._accepting:
            if self._state is ActorState.RESTARTING:
                raise ActorDead(self.name, self._last_crash)
            raise ActorStopped(self.name)

    async def tell(self, msg: Any) -> None:
        """Queue a message, waiting for room in the mailbox (backpressure).

        Tells are also accepted while the actor restarts after a crash: they
        wait in the mailbox for the new instance."""
        self._admit_tell(msg)
        await self._mailbox.put(_Letter(msg, None))

    def tell_nowait(self, msg: Any) -> None:
        """Queue a message or raise MailboxFull at once."""
        self._admit_tell(msg)
        try:
            self._mailbox.put_nowait(_Letter(msg, None))
        except asyncio.QueueFull:
            raise MailboxFull(self.name, self.mailbox_size) from None

    def _admit_tell(self, msg: Any) -> None:
        if self._state is ActorState.RESTARTING and type(msg) in self._handlers:
            return
        self._admit(msg)

    async def ask(
        self, msg: Any, timeout: float | None = None, *, wait_for_room: bool = True
    ) -> Any:
        """Send a message and return the handler's reply, or raise its exception.

        ``timeout`` bounds the whole wait (queueing included) and raises
        AskTimeout. With ``wait_for_room=False`` a full mailbox raises MailboxFull."""
        self._admit(msg)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        letter = _Letter(msg, reply)
        try:
            self._mailbox.put_nowait(letter)
        except asyncio.QueueFull:
            if not wait_for_room:
                raise MailboxFull(self.name, self.mailbox_size) from None
            return await self._ask_when_room(letter, reply, timeout)
        # The common case, kept cheap: a timer on the reply, not a timeout scope.
        timer = (
            None
            if timeout is None
            else loop.call_later(timeout, _expire, reply, self.name, timeout)
        )
        try:
            return await reply
        finally:
            if timer is not None:
                timer.cancel()
            if not reply.done():
                reply.cancel()  # the asker has gone: the worker skips the letter

    async def _ask_when_room(
        self, letter: _Letter, reply: asyncio.Future[Any], timeout: float | None
    ) -> Any:
        """A full mailbox: wait for room, then for the reply, all within ``timeout``."""
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await self._mailbox.put(letter)
                return await reply
        except TimeoutError:
            if not deadline.expired():
                raise  # the handler's own TimeoutError, passed on as it is
            raise AskTimeout(self.name, timeout or 0.0) from None
        finally:
            if not reply.done():
                reply.cancel()

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
        self._last_check = None
        with structlog.contextvars.bound_contextvars(actor=self.name):
            await self.on_start()
        if restarting:
            self.stats.restarts += 1
        self._spawn()
        self._accepting = True
        self._state = ActorState.RUNNING

    def _spawn(self) -> None:
        for i in range(self.concurrency):
            self._track(self._workers, self._worker(), f"{self.name}.worker{i}")
        self._track(self._background, self._run_body(), f"{self.name}.run")
        self._track(self._background, self._health_loop(), f"{self.name}.health")

    def _track(self, bag: set[asyncio.Task[None]], coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        bag.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        self._background.discard(task)
        self._busy.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._crashed(exc)

    async def _run_body(self) -> None:
        structlog.contextvars.bind_contextvars(actor=self.name)
        await self.run()

    async def _health_loop(self) -> None:
        structlog.contextvars.bind_contextvars(actor=self.name)
        # The flag matters as much as cancellation: on Python 3.11 a library's
        # internal asyncio.wait_for can swallow a cancel (CPython gh-86296).
        # A failing check is tried again soon, then less and less often up to
        # health_interval: readiness turns at once when a dependency comes
        # (at start-up, after an outage), without probing a dead one hard.
        retry = 0.05
        while not self._halting:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(max(self.health_interval, 1.0)):
                    result = await self.check()
            except TimeoutError:
                result = Health(status="fail", detail="health check timed out")
            except Exception as exc:  # a failing probe is a health result, not a crash
                result = Health(status="fail", detail=f"{type(exc).__name__}: {exc}")
            if result is not None:
                observed = result.observed_ms
                if observed is None:
                    observed = round((time.perf_counter() - started) * 1000, 3)
                self._last_check = msgspec.structs.replace(
                    result, observed_ms=observed, checked_at=time.time()
                )
            if result is not None and result.status == "fail":
                await asyncio.sleep(min(retry, self.health_interval))
                retry *= 2
            else:
                retry = 0.05
                await asyncio.sleep(self.health_interval)

    async def refresh_health(self) -> Health:
        """Run the check now (used right after start and by tests); returns health().
        As in the periodic loop, a failing probe is a health result, never a crash."""
        try:
            result = await self.check()
        except Exception as exc:
            result = Health(status="fail", detail=f"{type(exc).__name__}: {exc}")
        if result is not None:
            self._last_check = msgspec.structs.replace(result, checked_at=time.time())
        return self.health()

    async def _worker(self) -> None:
        structlog.contextvars.bind_contextvars(actor=self.name)
        task = asyncio.current_task()
        assert task is not None
        while not self._halting:
            letter = await self._mailbox.get()
            self._busy.add(task)
            if self.batch_max == 1:
                try:
                    await self._deliver(letter)
                finally:
                    self._busy.discard(task)
                    self._mailbox.task_done()
                continue
            letters = [letter]
            while len(letters) < self.batch_max:
                try:
                    letters.append(self._mailbox.get_nowait())
                except asyncio.QueueEmpty:
                    break
            try:
                await self._deliver_batch(letters)
            finally:
                self._busy.discard(task)
                for _ in letters:
                    self._mailbox.task_done()

    async def _deliver(self, letter: _Letter) -> None:
        reply = letter.reply
        if reply is not None and reply.done():
            return  # the asker timed out or was cancelled; nobody wants the answer
        handler = getattr(self, self._handlers[type(letter.msg)])
        try:
            result = await handler(letter.msg)
        except asyncio.CancelledError:
            # Cancelled past the stop deadline: the asker must not wait for its own timeout.
            if reply is not None and not reply.done():
                reply.set_exception(ActorStopped(self.name))
            raise
        except Exception as exc:
            if reply is None:
                self.log.error("tell_failed", message=type(letter.msg).__name__, error=repr(exc))
                raise
            self.stats.ask_errors += 1
            if not reply.done():
                reply.set_exception(exc)
        else:
            self.stats.processed += 1
            if reply is not None and not reply.done():
                reply.set_result(result)

    async def _deliver_batch(self, letters: list[_Letter]) -> None:
        live = [lt for lt in letters if lt.reply is None or not lt.reply.done()]
        if not live:
            return
        try:
            results = await self.handle_batch([lt.msg for lt in live])
        except asyncio.CancelledError:
            for lt in live:
                if lt.reply is not None and not lt.reply.done():
                    lt.reply.set_exception(ActorStopped(self.name))
            raise
        except Exception as exc:
            # The whole batch failed: every asker hears why; a tell among them
            # makes it a crash, as a failing tell would alone.
            for lt in live:
                if lt.reply is not None and not lt.reply.done():
                    lt.reply.set_exception(exc)
            if any(lt.reply is None for lt in live):
                raise
            self.stats.ask_errors += len(live)
            return
        if len(results) != len(live):
            raise RuntimeError(
                f"{self.name}: handle_batch returned {len(results)} results for {len(live)}"
            )
        for lt, result in zip(live, results, strict=True):
            if isinstance(result, Exception):
                if lt.reply is None:
                    self.log.error("tell_failed", message=type(lt.msg).__name__, error=repr(result))
                    continue
                self.stats.ask_errors += 1
                if not lt.reply.done():
                    lt.reply.set_exception(result)
            else:
                self.stats.processed += 1
                if lt.reply is not None and not lt.reply.done():
                    lt.reply.set_result(result)

    # -- crash -------------------------------------------------------------------
    def _crashed(self, exc: BaseException) -> None:
        if self._state is not ActorState.RUNNING:
            return  # already handling a crash, or stopping
        self.stats.crashes += 1
        self._last_crash = f"{type(exc).__name__}: {exc}"
        self._state = ActorState.RESTARTING
        self._accepting = False
        self.log.error("actor_crashed", error=self._last_crash, exc_info=exc)
        self._fail_queued_asks(ActorDead(self.name, self._last_crash))
        self._crash_task = asyncio.get_running_loop().create_task(
            self._after_crash(exc), name=f"{self.name}.crash"
        )

    async def _after_crash(self, exc: BaseException) -> None:
        await self._halt(deadline=self.stop_hook_timeout)
        await self._run_stop_hook()
        if self._on_crash is not None:
            self._on_crash(self, exc)
        else:
            self._state = ActorState.FAILED

    def _fail_queued_asks(self, error: ActorError) -> int:
        """Fail queued asks with ``error``; keep queued tells. Returns tells kept."""
        kept: list[_Letter] = []
        while True:
            try:
                letter = self._mailbox.get_nowait()
            except asyncio.QueueEmpty:
                break
            self._mailbox.task_done()
            if letter.reply is None:
                kept.append(letter)
            elif not letter.reply.done():
                letter.reply.set_exception(error)
        for letter in kept:  # synchronous: no producer can take the room meanwhile
            self._mailbox.put_nowait(letter)
        return len(kept)

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
        """Stop accepting, drain the mailbox up to ``timeout``, cancel the rest,
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
                    await self._mailbox.join()
            except TimeoutError:
                drained = False
        await self._halt(deadline=0.0 if not drained else max(timeout, 0.0))
        dropped = self._fail_queued_asks(ActorStopped(self.name))
        # Tells still queued now can no longer be served: count, then discard them.
        while not self._mailbox.empty():
            self._mailbox.get_nowait()
            self._mailbox.task_done()
        self.stats.dropped_on_stop += dropped
        if was in (ActorState.RUNNING, ActorState.RESTARTING, ActorState.STARTING):
            await self._run_stop_hook()
        self._state = ActorState.STOPPED
        self.log.info(
            "actor_stopped", drained=drained, dropped=dropped, processed=self.stats.processed
        )

    def snapshot(self) -> dict[str, Any]:
        """Plain data for /stats and /metrics."""
        h = self.health()
        return {
            "state": self._state.value,
            "mailbox": {"depth": self.mailbox_depth, "size": self.mailbox_size},
            "concurrency": self.concurrency,
            "processed": self.stats.processed,
            "askErrors": self.stats.ask_errors,
            "crashes": self.stats.crashes,
            "restarts": self.stats.restarts,
            "droppedOnStop": self.stats.dropped_on_stop,
            "health": h.status,
        }
