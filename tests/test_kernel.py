"""The actor kernel and the supervisor (DESIGN §2)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

import msgspec
import pytest

from actors import (
    Actor,
    ActorDead,
    ActorState,
    ActorStopped,
    AskTimeout,
    Escalation,
    FatalActorError,
    MailboxFull,
    Supervisor,
    UnknownMessage,
    handles,
)
from config import SupervisorSettings

FAST = SupervisorSettings(max_restarts=3, restart_window=30, backoff_initial=0.01, backoff_max=0.05)


class Echo(msgspec.Struct, frozen=True):
    value: Any


class Boom(msgspec.Struct, frozen=True):
    message: str


class Record(msgspec.Struct, frozen=True):
    value: Any


class Hold(msgspec.Struct, frozen=True):
    """Handled only once ``gate`` opens; ``entered`` is set when handling begins."""

    gate: Any
    entered: Any
    tag: str = ""


class NotHandled(msgspec.Struct, frozen=True):
    pass


class Probe(Actor):
    def __init__(self, name: str = "probe", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.seen: list[Any] = []
        self.starts = 0
        self.stops = 0
        self.events: list[str] | None = None
        self.fail_start: BaseException | None = None

    async def on_start(self) -> None:
        self.starts += 1
        if self.events is not None:
            self.events.append(f"start:{self.name}")
        if self.fail_start is not None:
            raise self.fail_start

    async def on_stop(self) -> None:
        self.stops += 1
        if self.events is not None:
            self.events.append(f"stop:{self.name}")

    @handles(Echo)
    async def _echo(self, msg: Echo) -> Any:
        return msg.value

    @handles(Boom)
    async def _boom(self, msg: Boom) -> None:
        raise ValueError(msg.message)

    @handles(Record)
    async def _record(self, msg: Record) -> None:
        self.seen.append(msg.value)

    @handles(Hold)
    async def _hold(self, msg: Hold) -> str:
        msg.entered.set()
        await msg.gate.wait()
        self.seen.append(msg.tag)
        return msg.tag


def hold(tag: str = "") -> Hold:
    return Hold(gate=asyncio.Event(), entered=asyncio.Event(), tag=tag)


async def test_ask_returns_the_handlers_reply() -> None:
    actor = Probe()
    await actor.start()
    assert await actor.ask(Echo({"a": 1}), timeout=1) == {"a": 1}
    await actor.stop()


async def test_ask_error_reaches_the_caller_and_the_actor_keeps_running() -> None:
    actor = Probe()
    await actor.start()
    with pytest.raises(ValueError, match="bad input"):
        await actor.ask(Boom("bad input"), timeout=1)
    assert actor.state is ActorState.RUNNING
    assert await actor.ask(Echo(2), timeout=1) == 2
    assert actor.stats.ask_errors == 1
    await actor.stop()


async def test_unknown_message_is_rejected_at_the_call_site() -> None:
    actor = Probe()
    await actor.start()
    with pytest.raises(UnknownMessage, match="NotHandled"):
        await actor.ask(NotHandled())
    with pytest.raises(UnknownMessage):
        actor.tell_nowait(NotHandled())
    assert actor.mailbox_depth == 0
    await actor.stop()


async def test_tell_nowait_on_a_full_mailbox_raises_mailbox_full_and_queues_nothing() -> None:
    actor = Probe(mailbox_size=2)
    await actor.start()
    blocker = hold()
    actor.tell_nowait(blocker)
    await blocker.entered.wait()  # the worker holds it; the mailbox is empty again
    actor.tell_nowait(Record(1))
    actor.tell_nowait(Record(2))
    with pytest.raises(MailboxFull, match="full"):
        actor.tell_nowait(Record(3))
    with pytest.raises(MailboxFull):
        await actor.ask_nowait(Echo(1))
    assert actor.mailbox_depth == 2
    blocker.gate.set()
    await actor.stop()
    assert actor.seen == ["", 1, 2]


async def test_tell_waits_for_room_instead_of_dropping() -> None:
    actor = Probe(mailbox_size=1)
    await actor.start()
    blocker = hold()
    await actor.tell(blocker)
    await blocker.entered.wait()
    await actor.tell(Record(1))  # fills the mailbox
    waiting = asyncio.create_task(actor.tell(Record(2)))
    await asyncio.sleep(0)  # let it reach the full mailbox
    assert not waiting.done()
    blocker.gate.set()
    await asyncio.wait_for(waiting, 2)
    await actor.stop()
    assert actor.seen == ["", 1, 2]


async def test_ask_times_out_with_ask_timeout_and_the_late_reply_is_discarded() -> None:
    actor = Probe()
    await actor.start()
    msg = hold("late")
    with pytest.raises(AskTimeout, match="did not answer"):
        await actor.ask(msg, timeout=0.05)
    assert isinstance(AskTimeout("x", 1), TimeoutError)
    msg.gate.set()
    assert await actor.ask(Echo("next"), timeout=1) == "next"
    await actor.stop()


async def test_concurrency_runs_that_many_handlers_at_once() -> None:
    actor = Probe(concurrency=3)
    await actor.start()
    msgs = [hold(str(i)) for i in range(3)]
    asks = [asyncio.create_task(actor.ask(m, timeout=2)) for m in msgs]
    for m in msgs:  # all three are inside their handler at the same time
        await asyncio.wait_for(m.entered.wait(), 1)
    for m in msgs:
        m.gate.set()
    assert sorted(await asyncio.gather(*asks)) == ["0", "1", "2"]
    await actor.stop()


async def test_stop_drains_queued_messages_in_order_before_on_stop() -> None:
    actor = Probe()
    await actor.start()
    for i in range(50):
        actor.tell_nowait(Record(i))
    await actor.stop(timeout=5)
    assert actor.seen == list(range(50))
    assert actor.stops == 1
    assert actor.state is ActorState.STOPPED
    with pytest.raises(ActorStopped):
        actor.tell_nowait(Record(99))


async def test_stop_past_its_deadline_cancels_and_fails_the_asks_left() -> None:
    actor = Probe()
    await actor.start()
    stuck = hold("stuck")
    in_flight = asyncio.create_task(actor.ask(stuck, timeout=10))
    await stuck.entered.wait()
    queued = asyncio.create_task(actor.ask(Echo("queued"), timeout=10))
    await asyncio.sleep(0)
    await actor.stop(timeout=0.1)
    with pytest.raises(ActorStopped):
        await in_flight
    with pytest.raises(ActorStopped):
        await queued
    assert actor.stops == 1


async def test_stop_is_idempotent() -> None:
    actor = Probe()
    await actor.start()
    await actor.stop()
    await actor.stop()
    assert actor.stops == 1


async def test_tell_failure_crashes_the_actor_and_the_supervisor_restarts_it() -> None:
    actor = Probe()
    sup = Supervisor([actor], FAST)
    await sup.start()
    actor.tell_nowait(Boom("poison"))
    await _wait_for(lambda: actor.stats.restarts == 1 and actor.state is ActorState.RUNNING)
    assert actor.stats.crashes == 1
    assert actor.starts == 2
    assert actor.stops == 1  # on_stop ran before the restart: resources were released
    assert await actor.ask(Echo("alive"), timeout=1) == "alive"
    assert not sup.escalated.is_set()
    await sup.stop(timeout=2)


async def test_a_crash_fails_queued_asks_at_once_and_keeps_queued_tells() -> None:
    actor = Probe()
    sup = Supervisor([actor], FAST)
    await sup.start()
    gate = hold()
    actor.tell_nowait(gate)
    await gate.entered.wait()
    actor.tell_nowait(Boom("poison"))
    pending_ask = asyncio.create_task(actor.ask(Echo("x"), timeout=10))
    await asyncio.sleep(0)
    actor.tell_nowait(Record("kept"))
    gate.gate.set()
    with pytest.raises(ActorDead, match="poison"):
        await asyncio.wait_for(pending_ask, 2)
    await _wait_for(lambda: actor.seen == ["", "kept"])
    await sup.stop(timeout=2)


async def test_asks_during_a_restart_fail_fast_with_actor_dead() -> None:
    actor = Probe()
    slow = SupervisorSettings(max_restarts=3, restart_window=30, backoff_initial=1, backoff_max=1)
    sup = Supervisor([actor], slow)
    await sup.start()
    actor.tell_nowait(Boom("x"))
    await _wait_for(lambda: actor.state is ActorState.RESTARTING)
    with pytest.raises(ActorDead):
        await actor.ask(Echo(1), timeout=5)
    await sup.stop(timeout=2)


async def test_a_spent_restart_budget_escalates() -> None:
    actor = Probe()
    sup = Supervisor([actor], FAST)
    await sup.start()
    for _ in range(FAST.max_restarts + 1):
        await _wait_for(lambda: actor.state is ActorState.RUNNING or sup.escalated.is_set())
        if sup.escalated.is_set():
            break
        actor.tell_nowait(Boom("again"))
        await _wait_for(lambda: actor.state is not ActorState.RUNNING)
    await asyncio.wait_for(sup.escalated.wait(), 2)
    assert sup.escalation is not None
    assert "more than 3 restarts" in str(sup.escalation)
    await sup.stop(timeout=2)


async def test_a_fatal_error_at_start_escalates_without_retrying() -> None:
    actor = Probe()
    actor.fail_start = FatalActorError("binary missing")
    sup = Supervisor([actor], FAST)
    with pytest.raises(Escalation, match="binary missing"):
        await sup.start()
    assert actor.starts == 1
    assert sup.escalated.is_set()


async def test_a_failing_start_is_retried_within_the_budget() -> None:
    actor = Probe()
    actor.fail_start = RuntimeError("not yet")

    async def heal() -> None:
        await _wait_for(lambda: actor.starts >= 2)
        actor.fail_start = None

    healer = asyncio.create_task(heal())
    sup = Supervisor([actor], FAST)
    await sup.start()
    await healer
    assert actor.state is ActorState.RUNNING
    await sup.stop(timeout=2)


async def test_supervisor_starts_in_order_and_stops_in_reverse() -> None:
    events: list[str] = []
    actors = [Probe(n) for n in ("a", "b", "c")]
    for a in actors:
        a.events = events
    sup = Supervisor(list(actors), FAST)
    await sup.start()
    await sup.stop(timeout=2)
    assert events == ["start:a", "start:b", "start:c", "stop:c", "stop:b", "stop:a"]


class Server(Probe):
    """An actor that needs no other: each waits, in its start, for the other to be starting."""

    independent = True
    met: asyncio.Event | None = None
    other: Server | None = None

    async def on_start(self) -> None:
        self.met = self.met or asyncio.Event()
        await super().on_start()
        assert self.other is not None
        self.other.met = self.other.met or asyncio.Event()
        self.other.met.set()
        await asyncio.wait_for(self.met.wait(), 2)


async def test_independent_neighbours_start_side_by_side_and_all_stop() -> None:
    events: list[str] = []
    first, second, after = Server("pg"), Server("valkey"), Probe("persistence")
    first.other, second.other = second, first
    for a in (first, second, after):
        a.events = events
    sup = Supervisor([first, second, after], FAST)
    await sup.start()  # one after the other, each would wait for the other in vain
    assert events == ["start:pg", "start:valkey", "start:persistence"]
    await sup.stop(timeout=2)
    assert events[3:] == ["stop:persistence", "stop:valkey", "stop:pg"]


async def test_when_one_of_two_side_by_side_cannot_start_both_are_stopped() -> None:
    events: list[str] = []
    broken, fine = Probe("pg"), Probe("valkey")
    broken.independent = fine.independent = True  # type: ignore[misc]
    broken.fail_start = FatalActorError("binary missing")
    for a in (broken, fine):
        a.events = events
    sup = Supervisor([broken, fine, Probe("persistence")], FAST)
    with pytest.raises(Escalation, match="binary missing"):
        await sup.start()
    await sup.stop(timeout=2)
    # Both stopped (the broken one may hold half of what it acquired); the
    # actor after them never started.
    assert events == ["start:pg", "start:valkey", "stop:valkey", "stop:pg"]


async def test_actor_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor([Probe("x"), Probe("x")])


async def test_a_crash_in_run_is_a_crash_too() -> None:
    class Runner(Probe):
        async def run(self) -> None:
            if self.starts == 1:
                raise RuntimeError("background died")

    actor = Runner()
    sup = Supervisor([actor], FAST)
    await sup.start()
    await _wait_for(lambda: actor.stats.restarts == 1 and actor.state is ActorState.RUNNING)
    assert actor.stats.crashes == 1
    assert actor.starts == 2
    await sup.stop(timeout=2)


async def test_health_reports_state_and_the_cached_check() -> None:
    from actors import Health

    class Checked(Probe):
        async def check(self) -> Health | None:
            return Health(status="warn", detail="half")

    actor = Checked(health_interval=0.05)
    assert actor.health().status == "fail"  # not started
    await actor.start()
    await _wait_for(lambda: actor.health().status == "warn")
    assert actor.health().observed_ms is not None
    await actor.stop()
    assert actor.health().status == "fail"
    assert "stopped" in actor.health().detail


async def _wait_for(predicate: Any, timeout: float = 3.0) -> None:
    """Poll a condition that has no event of its own (actor state)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_a_handlers_own_timeout_error_is_not_mistaken_for_an_ask_timeout() -> None:
    class Slow(Probe):
        @handles(NotHandled)
        async def _timeout(self, _msg: NotHandled) -> None:
            raise TimeoutError("pool acquire timed out")

    actor = Slow()
    await actor.start()
    with pytest.raises(TimeoutError, match="pool acquire") as err:
        await actor.ask(NotHandled(), timeout=5)
    assert not isinstance(err.value, AskTimeout)
    await actor.stop()


class FailAfter(msgspec.Struct, frozen=True):
    """Fails once ``gate`` opens; ``entered`` is set when handling begins."""

    gate: Any
    entered: Any


class Failing(Probe):
    @handles(FailAfter)
    async def _fail_after(self, msg: FailAfter) -> None:
        msg.entered.set()
        await msg.gate.wait()
        raise ValueError("nobody is waiting for this")


async def test_a_cancelled_asker_leaves_no_unretrieved_exception_behind() -> None:
    """An asker that gives up while its handler runs: the handler's failure
    must not end up in a future nobody reads ("exception was never retrieved",
    reported by the loop when the future is collected)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    actor = Failing()
    await actor.start()
    try:
        msg = FailAfter(gate=asyncio.Event(), entered=asyncio.Event())
        task = asyncio.create_task(actor.ask(msg, timeout=5))
        await msg.entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        msg.gate.set()
        assert await actor.ask(Echo("after"), timeout=5) == "after"  # the failure happened
        queued = asyncio.create_task(actor.ask(Boom("queued"), timeout=5))
        await asyncio.sleep(0)
        queued.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await queued
        assert await actor.ask(Echo("again"), timeout=5) == "again"
        del task, queued
        gc.collect()
        assert reported == []
        assert actor.stats.crashes == 0
    finally:
        loop.set_exception_handler(previous)
        await actor.stop()
