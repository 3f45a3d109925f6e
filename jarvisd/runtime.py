"""What the HTTP layer and the CLI may see of the running daemon.

Handlers reach actors only through this: their message API (ask/tell), their
non-blocking ``health()`` and ``snapshot()``, never their connections.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from actors import Actor, Supervisor
from config import Settings
from jarvisd.lists import ListCache
from jarvisd.principals import PrincipalCache

ComponentType = Literal["datastore", "component", "system"]


@dataclass(frozen=True, slots=True)
class Check:
    """One entry of the readiness document: which actor answers for it."""

    name: str
    actor: Actor
    component_type: ComponentType = "component"
    # A failing non-critical check makes the document "warn", not "fail".
    critical: bool = True


@dataclass
class Runtime:
    settings: Settings
    supervisor: Supervisor
    checks: list[Check]
    version: str
    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    draining: bool = False
    principals: PrincipalCache = field(default_factory=lambda: PrincipalCache(size=10_000, ttl=30))
    lists: ListCache = field(default_factory=ListCache)
    # (monotonic time, draining, status, body, document) of the last readiness answer.
    ready_memo: tuple[float, bool, int, bytes, dict[str, Any]] | None = None

    @property
    def name(self) -> str:
        """This daemon's name among several (daemon.name, else the host name)."""
        return self.settings.daemon.name or socket.gethostname()

    def actor(self, name: str) -> Actor:
        return self.supervisor.get(name)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_monotonic
