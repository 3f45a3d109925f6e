"""What the HTTP layer and the CLI may see of the running daemon.

Handlers reach actors only through this: typed references whose asks never
wait for room (a full mailbox is a 503 at once) and time out after
``http.request_timeout``, the actors' non-blocking ``health()`` and
``snapshot()``, never their connections.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from actors import Actor, Supervisor
from actors.approvals import Approvals, ApprovalsRef
from actors.bus import Bus, BusRef
from actors.cache import Cache, CacheRef
from actors.embedded import ChildServer
from actors.outbox import Relay, Webhooks, WebhooksRef
from actors.persistence import Persistence, PersistenceRef
from actors.pubsub import PubSub, PubSubRef
from actors.redis_link import RedisLink, RedisRef
from actors.sessions import Logins, LoginsRef, Sessions, SessionsRef
from config import Settings
from jarvisd.lists import ListCache
from jarvisd.principals import PrincipalCache

__all__ = ["Check", "DaemonActors", "Runtime"]

ComponentType = Literal["datastore", "component", "system"]


@dataclass(frozen=True, slots=True)
class Check:
    """One entry of the readiness document: which actor answers for it."""

    name: str
    actor: Actor
    component_type: ComponentType = "component"
    # A failing non-critical check makes the document "warn", not "fail".
    critical: bool = True


@dataclass(frozen=True)
class DaemonActors:
    """The daemon's actors, each by its kind (``embedded``: the servers run
    in embedded mode, if any)."""

    persistence: Persistence
    redis: RedisLink
    cache: Cache
    sessions: Sessions
    logins: Logins
    pubsub: PubSub
    clients: PubSub  # pubsub-clients: what agents and clients can publish on
    approvals: Approvals
    bus: Bus
    relay: Relay
    webhooks: Webhooks
    embedded: tuple[ChildServer, ...] = ()

    def in_start_order(self) -> list[Actor]:
        return [
            *self.embedded,
            self.persistence,
            self.redis,
            self.cache,
            self.sessions,
            self.logins,
            self.pubsub,
            self.clients,
            self.relay,
            self.webhooks,
            self.approvals,
            self.bus,
        ]


@dataclass
class Runtime:
    settings: Settings
    supervisor: Supervisor
    checks: list[Check]
    version: str
    actors: DaemonActors
    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    draining: bool = False
    principals: PrincipalCache = field(default_factory=lambda: PrincipalCache(size=10_000, ttl=30))
    lists: ListCache = field(default_factory=ListCache)
    # (monotonic time, draining, status, body, document) of the last readiness answer.
    ready_memo: tuple[float, bool, int, bytes, dict[str, Any]] | None = None
    # The actors as the HTTP edge reaches them.
    persistence: PersistenceRef = field(init=False)
    cache: CacheRef = field(init=False)
    sessions: SessionsRef = field(init=False)
    logins: LoginsRef = field(init=False)
    pubsub: PubSubRef = field(init=False)
    clients: PubSubRef = field(init=False)
    approvals: ApprovalsRef = field(init=False)
    bus: BusRef = field(init=False)
    redis: RedisRef = field(init=False)
    webhooks: WebhooksRef = field(init=False)

    def __post_init__(self) -> None:
        a, wait = self.actors, self.request_timeout
        self.persistence = PersistenceRef(a.persistence, timeout=wait, edge=True)
        self.cache = CacheRef(a.cache, timeout=wait, edge=True)
        self.sessions = SessionsRef(a.sessions, timeout=wait, edge=True)
        self.logins = LoginsRef(a.logins, timeout=wait, edge=True)
        self.pubsub = PubSubRef(a.pubsub, timeout=wait, edge=True)
        self.clients = PubSubRef(a.clients, timeout=wait, edge=True)
        self.approvals = ApprovalsRef(a.approvals, timeout=wait, edge=True)
        self.bus = BusRef(a.bus, timeout=wait, edge=True)
        self.redis = RedisRef(a.redis, timeout=wait, edge=True)
        self.webhooks = WebhooksRef(a.webhooks, timeout=wait, edge=True)

    def request_timeout(self) -> float:
        return self.settings.http.request_timeout

    @property
    def name(self) -> str:
        """This daemon's name among several (daemon.name, else the host name)."""
        return self.settings.daemon.name or socket.gethostname()

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_monotonic
