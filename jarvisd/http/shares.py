"""Shares of the daemon's long-lived places (DESIGN §8): no one caller may
take them all.

- WebSockets: at most ``http.max_websockets_per_principal`` per user (the
  local admin counts as one), beside the daemon-wide ``http.max_websockets``;
  sockets yet to authenticate, at most ``http.max_unauthenticated_per_address``
  per client address, beside a tenth of the places in all.
- Long-poll waiters: at most ``approvals.max_waiters_per_principal`` per user;
  past it (or past the daemon's ``approvals.max_waiters``), a long-poll is
  answered at once with the current state, never refused.
- Subscriptions: at most ``pubsub.max_subscriptions_per_principal`` channels
  and ``pubsub.max_patterns_per_principal`` patterns per user over all their
  sockets, and ``pubsub.max_patterns`` distinct patterns in the daemon (each
  pattern costs every PUBLISH on the Redis server, for every tenant on it).

Client addresses: the peer's, or with ``http.trusted_proxies`` naming the
peer, the nearest address in ``X-Forwarded-For`` that is not a trusted proxy.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from aiohttp import web

from actors.data.model import Principal
from config import HttpSettings, PubSubSettings

__all__ = ["Full", "Shares", "client_address", "principal_key"]


class Full(Exception):
    """A share is used up (HTTP 429 for a new socket; a long-poll answers at once)."""

    def __init__(self, what: str, limit: int, setting: str) -> None:
        super().__init__(f"{what}: at most {limit} ({setting})")
        self.setting = setting


def principal_key(who: Principal) -> str:
    return f"user:{who.user_id}" if who.user_id is not None else f"local:{who.name}"


def client_address(request: web.Request, settings: HttpSettings) -> str:
    """The client's address; behind a trusted proxy, the one it names. Every
    Unix-socket client counts as one address."""
    peer = request.remote or "unix"
    trusted = settings.trusted_proxies
    if not trusted or peer not in trusted:
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")]
    for hop in reversed([h for h in hops if h]):
        if hop not in trusted:
            return hop[:64]
    return peer


class Shares:
    def __init__(self) -> None:
        self.websockets: Counter[str] = Counter()
        self.unauthenticated: Counter[str] = Counter()
        self.waiters: Counter[str] = Counter()
        self.channels: Counter[str] = Counter()
        self.patterns_by: Counter[str] = Counter()
        self.patterns: Counter[str] = Counter()  # distinct pattern -> sockets holding it
        self.refused = 0

    def take_subscriptions(
        self, key: str, channels: list[str], patterns: list[str], settings: PubSubSettings
    ) -> str | None:
        """Count new channels and patterns against ``key``'s share and the
        daemon's; None when they fit (and are counted), else why not."""
        if self.channels[key] + len(channels) > settings.max_subscriptions_per_principal:
            return (
                f"at most {settings.max_subscriptions_per_principal} channels for one user "
                "(pubsub.max_subscriptions_per_principal)"
            )
        if self.patterns_by[key] + len(patterns) > settings.max_patterns_per_principal:
            return (
                f"at most {settings.max_patterns_per_principal} patterns for one user "
                "(pubsub.max_patterns_per_principal)"
            )
        distinct = {p for p in patterns if p not in self.patterns}
        if len(self.patterns) + len(distinct) > settings.max_patterns:
            return f"the daemon holds {settings.max_patterns} patterns (pubsub.max_patterns)"
        self.channels[key] += len(channels)
        self.patterns_by[key] += len(patterns)
        self.patterns.update(patterns)
        return None

    def give_back_subscriptions(self, key: str, channels: list[str], patterns: list[str]) -> None:
        _less(self.channels, key, len(channels))
        _less(self.patterns_by, key, len(patterns))
        for p in patterns:
            _less(self.patterns, p, 1)

    def take(self, counter: Counter[str], key: str, limit: int, setting: str) -> None:
        """One place of ``key``'s share (given back with ``give``); Full past ``limit``."""
        if counter[key] >= limit:
            self.refused += 1
            raise Full(f"too many at once for {key.split(':')[0]}", limit, setting)
        counter[key] += 1

    def give(self, counter: Counter[str], key: str) -> None:
        _less(counter, key, 1)

    @contextlib.contextmanager
    def hold(self, counter: Counter[str], key: str, limit: int, setting: str) -> Iterator[None]:
        """One place of ``key``'s share while the block runs; Full past ``limit``."""
        self.take(counter, key, limit, setting)
        try:
            yield
        finally:
            self.give(counter, key)


def _less(counter: Counter[str], key: str, n: int) -> None:
    counter[key] -= n
    if counter[key] <= 0:
        del counter[key]
