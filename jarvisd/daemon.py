"""The composition root: build the actors from the settings, run, stop.

Start order (DESIGN §3): embedded servers → persistence → redis, cache,
sessions, logins → pubsub → approvals → bus → http, all under the supervisor.
Before any of them, the instance lock on the state directory (``instance``).
Stop: the daemon first stops taking work (readiness turns 503, API requests
get 503 "draining"), waits for in-flight requests, then the supervisor stops
the actors in reverse start order under one deadline: HTTP first,
PostgreSQL last. The daemon's own tasks (status, reloads, the systemd
watchdog) are watched as the actors are: one that dies ends the daemon with
exit 1, and the watchdog stops pinging once anything has failed for good.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from actors import Escalation, FatalActorError, Supervisor
from actors.embedded import remove_gone_homes
from config import LoadedConfig, Settings, load_settings
from jarvisd import __version__
from jarvisd.banner import announce_ready
from jarvisd.build import build_actors
from jarvisd.http.health import readiness
from jarvisd.http.server import HttpServer
from jarvisd.instance import InstanceLock, InstanceLocked
from jarvisd.lists import ListCache
from jarvisd.logs import set_level
from jarvisd.principals import PrincipalCache
from jarvisd.reload import ReloadPlan, plan_reload, problems_of
from jarvisd.runtime import Runtime
from jarvisd.systemd import Notifier, Watchdog, watchdog_interval

__all__ = ["Daemon"]

log = structlog.get_logger("jarvisd", actor="daemon")  # lazy: follows configure()

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_FORCED = 130


class Daemon:
    """One run of jarvisd. ``run()`` returns the process exit code."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        sockets: list[socket.socket] | None = None,
        notifier: Notifier | None = None,
        config_arg: Path | None = None,
    ) -> None:
        self.loaded = loaded
        self.config_arg = config_arg if config_arg is not None else loaded.path
        self.settings = loaded.settings
        self.actors, checks = build_actors(self.settings)
        self.supervisor = Supervisor(self.actors.in_start_order(), self.settings.supervisor)
        self.runtime = Runtime(
            self.settings,
            self.supervisor,
            checks,
            __version__,
            self.actors,
            principals=PrincipalCache(
                size=self.settings.auth.cache_size, ttl=self.settings.auth.cache_ttl
            ),
            lists=ListCache(ttl=self.settings.http.list_cache_ttl),
        )
        # Started last, stopped first; supervised like every other actor.
        self.http = HttpServer(self.runtime, sockets=sockets)
        self.supervisor.add(self.http)
        self.notifier = notifier or Notifier()
        self.stop_requested = asyncio.Event()
        self.ready = asyncio.Event()
        self.reloads = 0
        self.restart_needed: list[str] = []
        self.lock: InstanceLock | None = None
        self._signals = 0
        self._stop_reason = ""
        self._reload_again = False
        # The daemon's own tasks (status, reloads, watchdog): each one's death
        # is seen (failed) and ends the daemon with exit 1, never silently.
        self._tasks: set[asyncio.Task[None]] = set()
        self._reloading: asyncio.Task[None] | None = None
        self.failed = asyncio.Event()
        self.failure = ""

    # -- signals -----------------------------------------------------------------
    def request_stop(self, reason: str = "requested") -> None:
        """Schedule shutdown once; safe to call from a signal handler."""
        if not self.stop_requested.is_set():
            self._stop_reason = reason
            self.runtime.draining = True
            self.runtime.lists.changed()  # long-polls of the event log answer now
            self.notifier.stopping(f"draining ({reason})")
            self.stop_requested.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            log.info("signal_received", signal=name, action="drain")
            self.request_stop(name)
            return
        # A second signal means the operator will not wait: leave now. Children
        # get their parent-death signal and stop on their own.
        log.warning("signal_received", signal=name, action="forced_exit")
        sys.stdout.flush()
        os._exit(EXIT_FORCED)

    def _on_hup(self) -> None:
        if self.stop_requested.is_set():
            return
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True  # coalesce: one more reload after this one
            return
        self._reloading = self._spawn(self._reload_loop(), "daemon.reload")

    async def _reload_loop(self) -> None:
        while True:
            self._reload_again = False
            await self.reload()
            if not self._reload_again:
                return

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, int(sig))
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    # -- reload ------------------------------------------------------------------
    async def reload(self) -> ReloadPlan | None:
        """Re-read the config; apply the live keys; report those needing a restart.
        An invalid file changes nothing and the daemon keeps its current settings."""
        self.notifier.reloading()
        try:
            loaded = await asyncio.to_thread(load_settings, self.config_arg)
        except Exception as err:  # a ConfigError, or one the loader did not foresee
            problems = problems_of(err)
            log.error(
                "reload_rejected", problems=problems, action="keeping the running configuration"
            )
            self.notifier.send(
                "READY=1",
                f"STATUS=reload rejected ({len(problems)} problem(s)): "
                f"{problems[0]}; running on the previous configuration",
            )
            self.notifier.last_status = ""
            return None
        plan = plan_reload(self.settings, loaded.settings)
        self._apply(plan.settings)
        self.reloads += 1
        self.restart_needed = sorted(set(self.restart_needed) | set(plan.restart_needed))
        log.info("reloaded", applied=plan.applied, restart_needed=plan.restart_needed)
        self.notifier.send("READY=1", f"STATUS={self._status_line()}")
        return plan

    def _apply(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime.settings = settings
        set_level(settings.daemon.log_level)
        self.supervisor.settings = settings.supervisor
        self.runtime.principals.ttl = settings.auth.cache_ttl
        self.runtime.principals.size = settings.auth.cache_size
        self.runtime.lists.ttl = settings.http.list_cache_ttl
        for actor in self.supervisor.actors:
            actor.health_interval = settings.daemon.health_interval
        a = self.actors
        a.persistence.approvals = settings.approvals
        a.cache.cache_settings = settings.cache
        a.pubsub.settings = a.clients.settings = settings.pubsub
        a.approvals.settings = settings.approvals
        a.bus.settings = settings.bus  # stream and group are bound at start (reload.RESTART_KEYS)
        a.sessions.settings = a.logins.settings = settings.sessions
        a.relay.settings = settings.events  # events.relay itself needs a restart
        a.webhooks.events = settings.events
        a.webhooks.configure(settings.webhooks)
        a.logins.auth = settings.auth

    # -- status ------------------------------------------------------------------
    def _status_line(self) -> str:
        if self.runtime.draining:
            return f"draining ({self._stop_reason or 'stopping'})"
        if not self.ready.is_set():
            return "starting"
        doc = readiness(self.runtime)
        failing = [
            name
            for name, entries in doc["checks"].items()
            for e in entries
            if e["status"] == "fail"
        ]
        if failing:
            line = f"degraded: {', '.join(failing)} failing"
        else:
            line = (
                f"ready: {len(self.supervisor.actors)} actors, "
                f"restarts {sum(a.stats.restarts for a in self.supervisor.actors)}, "
                f"listening on {', '.join(self.http.addresses)}"
            )
        if self.restart_needed:
            line += f"; restart needed for {', '.join(self.restart_needed)}"
        return line

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(self.settings.daemon.health_interval)
            self.notifier.status(self._status_line())

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.failure = f"{task.get_name()}: {type(exc).__name__}: {exc}"
        log.critical("daemon_task_failed", task=task.get_name(), error=self.failure, exc_info=exc)
        self.failed.set()

    # -- run ---------------------------------------------------------------------
    async def run(self, *, handle_signals: bool = True) -> int:
        started = time.monotonic()
        try:
            # Before anything else: a second daemon on this state directory
            # must not touch the first one's servers.
            self.lock = InstanceLock.take(Path(self.settings.daemon.state_dir))
        except InstanceLocked as exc:
            log.critical("start_refused", error=str(exc))
            self.notifier.status(f"failed: {exc}")
            self.notifier.close()
            return EXIT_FAILURE
        if handle_signals:
            self.install_signal_handlers()
        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            watchdog = Watchdog(self.notifier, interval, self._healthy)
            self._spawn(watchdog.run(), "systemd.watchdog")
        code = EXIT_OK
        try:
            if self.actors.embedded:
                # A relocated data home left by an instance that is gone (this
                # state directory deleted and made again, say) goes first.
                remove_gone_homes(self.actors.embedded[0].run_as, log)
            self.notifier.status("starting")
            log.info(
                "starting",
                version=__version__,
                config=str(self.loaded.path or "defaults"),
                state_dir=self.settings.daemon.state_dir,
                pid=os.getpid(),
                embedded=[a.name for a in self.actors.embedded],
                watchdog_interval=interval,
            )
            code = await self._start_and_serve(started)
        finally:
            watchdogs = [t for t in self._tasks if t.get_name() == "systemd.watchdog"]
            await self._cancel_tasks(keep=watchdogs)  # it pings on while the daemon stops
            code = await self._shutdown(code)
            await self._cancel_tasks()
            if handle_signals:
                self.remove_signal_handlers()
            self.notifier.close()
            if self.lock is not None:
                self.lock.release()
        return code

    def _healthy(self) -> bool:
        """Whether the watchdog may ping: nothing has failed for good."""
        return not (self.supervisor.escalated.is_set() or self.failed.is_set())

    async def _cancel_tasks(self, keep: list[asyncio.Task[None]] | None = None) -> None:
        tasks = [t for t in self._tasks if t not in (keep or [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _start_and_serve(self, started: float) -> int:
        startup = asyncio.create_task(self._start(), name="daemon.start")
        stop_wait = asyncio.create_task(self.stop_requested.wait(), name="daemon.stop-wait")
        escalation_wait = asyncio.create_task(
            self.supervisor.escalated.wait(), name="daemon.escalation"
        )
        failure_wait = asyncio.create_task(self.failed.wait(), name="daemon.failure")
        ends = {stop_wait, escalation_wait, failure_wait}
        try:
            await asyncio.wait({startup, *ends}, return_when=asyncio.FIRST_COMPLETED)
            if not startup.done():  # stop requested (or a failure) during start-up
                startup.cancel()
                await asyncio.gather(startup, return_exceptions=True)
                return EXIT_FAILURE if self.failed.is_set() else EXIT_OK
            try:
                startup.result()
            except (Escalation, FatalActorError) as exc:
                log.critical("start_failed", error=str(exc))
                self.notifier.status(f"failed: {exc}")
                return EXIT_FAILURE
            except Exception as exc:  # anything else at start-up: say what, exit 1, clean up
                log.critical("start_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
                self.notifier.status(f"failed: {exc}")
                return EXIT_FAILURE
            self.ready.set()
            if self.lock is not None:
                self.lock.record(self.http.addresses)
            # What start-up made lives as long as the process: keep it out of
            # the collector's way, so that full collections stay short under load.
            gc.freeze()
            # Requests make many short-lived objects: collect young ones less often.
            gc.set_threshold(10_000, 20, 20)
            # READY=1 means "config loaded, listeners up" - not "database reachable":
            # a database outage at boot must show as degraded, not as a restart loop.
            self.notifier.ready(self._status_line())
            self._spawn(self._report_status(), "daemon.status")
            log.info(
                "listening",
                seconds=round(time.monotonic() - started, 3),
                addresses=self.http.addresses,
            )
            self._spawn(
                announce_ready(
                    lambda: readiness(self.runtime)["status"] != "fail",
                    started,
                    lambda: {
                        "version": __version__,
                        "addresses": self.http.addresses,
                        "state_dir": Path(self.settings.daemon.state_dir),
                        "config": self.loaded.path,
                    },
                ),
                "daemon.announce",
            )
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            if self.stop_requested.is_set():
                return EXIT_OK
            reason = self.failure if self.failed.is_set() else str(self.supervisor.escalation)
            log.critical("escalated", reason=reason)
            self.notifier.status(f"failed: {reason}")
            return EXIT_FAILURE
        finally:
            for task in ends:
                task.cancel()
            await asyncio.gather(*ends, return_exceptions=True)

    async def _start(self) -> None:
        await self.supervisor.start()

    async def _shutdown(self, code: int) -> int:
        self.runtime.draining = True
        self.runtime.lists.changed()
        timeout = self.settings.daemon.shutdown_timeout
        deadline = time.monotonic() + timeout
        if not self.stop_requested.is_set():
            self.notifier.stopping("stopping" if code == EXIT_OK else "stopping after a failure")
        # Ask systemd for the drain deadline plus room to close, in case the
        # unit's TimeoutStopSec is shorter than daemon.shutdown_timeout.
        self.notifier.extend_timeout(timeout + 10)
        log.info(
            "draining",
            reason=self._stop_reason or ("escalation" if code else "exit"),
            deadline=timeout,
        )
        left_in_flight = 0
        grace = min(self.settings.daemon.drain_grace, timeout / 2)
        if grace > 0 and self.stop_requested.is_set() and self.http.runner is not None:
            await asyncio.sleep(grace)
        if self.http.runner is not None:
            left_in_flight = await self.http.wait_idle(min(timeout / 2, 5.0))
        summary: dict[str, Any] = await self.supervisor.stop(max(deadline - time.monotonic(), 1.0))
        log.info(
            "stopped",
            exit_code=code,
            seconds=round(timeout - (deadline - time.monotonic()), 3),
            actors=summary["actors"],
            errors=summary["errors"],
            dropped=summary["dropped"],
            http_in_flight_left=left_in_flight,
        )
        return code
