"""An actor's health: probed in the background, served from memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec

__all__ = ["Health", "HealthLoop", "HealthStatus"]

HealthStatus = Literal["pass", "warn", "fail"]


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """One component's health as last observed (never computed on the read path)."""

    status: HealthStatus
    detail: str = ""
    observed_ms: float | None = None
    checked_at: float = 0.0  # wall clock, seconds


class HealthLoop:
    """Runs an actor's ``check`` every ``interval`` seconds and keeps the last
    result. A failing check is tried again soon, then less and less often up
    to the interval: readiness turns at once when a dependency comes (at
    start-up, after an outage), without probing a dead one hard."""

    def __init__(self, check: Callable[[], Awaitable[Health | None]], interval: float) -> None:
        self.check = check
        self.interval = interval
        self.last: Health | None = None

    async def probe_once(self) -> Health | None:
        """One probe, its result kept; a probe that raises is a failing result."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(max(self.interval, 1.0)):
                result = await self.check()
        except TimeoutError:
            result = Health(status="fail", detail="health check timed out")
        except Exception as exc:  # a failing probe is a health result, not a crash
            result = Health(status="fail", detail=f"{type(exc).__name__}: {exc}")
        if result is not None:
            observed = result.observed_ms
            if observed is None:
                observed = round((time.perf_counter() - started) * 1000, 3)
            self.last = msgspec.structs.replace(
                result, observed_ms=observed, checked_at=time.time()
            )
        return result

    async def run(self, halting: Callable[[], bool]) -> None:
        # The flag matters as much as cancellation: on Python 3.11 a library's
        # internal asyncio.wait_for can swallow a cancel (CPython gh-86296).
        retry = 0.05
        while not halting():
            result = await self.probe_once()
            if result is not None and result.status == "fail":
                await asyncio.sleep(min(retry, self.interval))
                retry *= 2
            else:
                retry = 0.05
                await asyncio.sleep(self.interval)
