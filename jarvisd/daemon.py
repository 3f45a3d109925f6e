"""The composition root: build the actors from the settings, run, stop.

Start order (DESIGN §3): embedded servers → persistence → redis → http.
Stop: the daemon first stops taking work (readiness turns 503, API requests
get 503 "draining"), waits for in-flight requests, then stops the actors in
reverse start order under one deadline, and closes the HTTP listeners last,
so that health keeps answering "draining" while the actors drain.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from actors import Actor, Escalation, FatalActorError, Supervisor
from actors.embedded import EmbeddedPostgres, EmbeddedValkey, RunAs
from actors.persistence import Persistence
from actors.redis_link import RedisLink
from config import LoadedConfig, Settings
from jarvisd import __version__
from jarvisd.http.server import HttpServer
from jarvisd.runtime import Check, Runtime

__all__ = ["Daemon", "build_actors"]

log = structlog.get_logger("jarvisd").bind(actor="daemon")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_FORCED = 130


def build_actors(settings: Settings) -> tuple[list[Actor], list[Check]]:
    """The daemon's actors in start order, and the health checks they answer."""
    interval = settings.daemon.health_interval
    state_dir = Path(settings.daemon.state_dir)
    actors: list[Actor] = []
    checks: list[Check] = []
    run_as = RunAs.resolve(settings.embedded.postgres_user) if settings.embedded.enabled else None

    pg_dsn = settings.postgres.dsn
    if settings.embedded_postgres:
        assert run_as is not None
        pg = EmbeddedPostgres(
            state_dir,
            run_as=run_as,
            bin_dir=settings.embedded.postgres_bin_dir,
            start_timeout=settings.embedded.start_timeout,
        )
        pg.health_interval = interval
        actors.append(pg)
        checks.append(Check("embedded-postgres", pg, "system"))
        pg_dsn = pg.dsn
    redis_url = settings.redis.url
    if settings.embedded_redis:
        assert run_as is not None
        vk = EmbeddedValkey(
            state_dir,
            run_as=run_as,
            binary=settings.embedded.valkey_bin,
            start_timeout=settings.embedded.start_timeout,
        )
        vk.health_interval = interval
        actors.append(vk)
        checks.append(Check("embedded-valkey", vk, "system"))
        redis_url = vk.url
    # Both are guaranteed by the loader's cross checks.
    assert pg_dsn is not None
    assert redis_url is not None

    persistence = Persistence(settings.postgres, pg_dsn, health_interval=interval)
    redis = RedisLink(settings.redis, redis_url, health_interval=interval)
    actors += [persistence, redis]
    checks = [
        Check("postgres", persistence, "datastore"),
        Check("redis", redis, "datastore"),
        *checks,
    ]
    return actors, checks


class Daemon:
    """One run of jarvisd. ``run()`` returns the process exit code."""

    def __init__(self, loaded: LoadedConfig, *, sockets: list[socket.socket] | None = None) -> None:
        self.loaded = loaded
        self.settings = loaded.settings
        actors, checks = build_actors(self.settings)
        self.supervisor = Supervisor(actors, self.settings.supervisor)
        self.runtime = Runtime(self.settings, self.supervisor, checks, __version__)
        self.http = HttpServer(self.runtime, sockets=sockets)
        self.stop_requested = asyncio.Event()
        self.ready = asyncio.Event()
        self._signals = 0
        self._stop_reason = ""

    # -- signals -----------------------------------------------------------------
    def request_stop(self, reason: str = "requested") -> None:
        """Schedule shutdown once; safe to call from a signal handler."""
        if not self.stop_requested.is_set():
            self._stop_reason = reason
            self.runtime.draining = True
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

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, int(sig))

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    # -- run ---------------------------------------------------------------------
    async def run(self, *, handle_signals: bool = True) -> int:
        started = time.monotonic()
        if handle_signals:
            self.install_signal_handlers()
        code = EXIT_OK
        try:
            log.info(
                "starting",
                version=__version__,
                config=str(self.loaded.path or "defaults"),
                state_dir=self.settings.daemon.state_dir,
                pid=os.getpid(),
                embedded=[a.name for a in self.supervisor.actors if a.name.startswith("embedded")],
            )
            code = await self._start_and_serve(started)
        finally:
            code = await self._shutdown(code)
            if handle_signals:
                self.remove_signal_handlers()
        return code

    async def _start_and_serve(self, started: float) -> int:
        startup = asyncio.create_task(self._start(), name="daemon.start")
        stop_wait = asyncio.create_task(self.stop_requested.wait(), name="daemon.stop-wait")
        escalation_wait = asyncio.create_task(
            self.supervisor.escalated.wait(), name="daemon.escalation"
        )
        try:
            await asyncio.wait({startup, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not startup.done():  # stop requested during start-up
                startup.cancel()
                await asyncio.gather(startup, return_exceptions=True)
                return EXIT_OK
            try:
                startup.result()
            except (Escalation, FatalActorError) as exc:
                log.critical("start_failed", error=str(exc))
                return EXIT_FAILURE
            self.ready.set()
            log.info(
                "ready", seconds=round(time.monotonic() - started, 3), listening=self.http.addresses
            )
            await asyncio.wait({stop_wait, escalation_wait}, return_when=asyncio.FIRST_COMPLETED)
            if self.supervisor.escalated.is_set() and not self.stop_requested.is_set():
                log.critical("escalated", reason=str(self.supervisor.escalation))
                return EXIT_FAILURE
            return EXIT_OK
        finally:
            for task in (stop_wait, escalation_wait):
                task.cancel()
            await asyncio.gather(stop_wait, escalation_wait, return_exceptions=True)

    async def _start(self) -> None:
        await self.supervisor.start()
        await self.http.start()

    async def _shutdown(self, code: int) -> int:
        self.runtime.draining = True
        timeout = self.settings.daemon.shutdown_timeout
        deadline = time.monotonic() + timeout
        log.info(
            "draining",
            reason=self._stop_reason or ("escalation" if code else "exit"),
            deadline=timeout,
        )
        left_in_flight = 0
        if self.http.runner is not None:
            left_in_flight = await self.http.wait_idle(min(timeout / 2, 5.0))
        summary: dict[str, Any] = await self.supervisor.stop(max(deadline - time.monotonic(), 1.0))
        await self.http.stop(timeout=max(deadline - time.monotonic(), 0.5))
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
