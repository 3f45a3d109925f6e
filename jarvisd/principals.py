"""The principal cache: who a bearer token is, without asking PostgreSQL
(or Redis) on every request (DESIGN §8).

- Keyed by SHA-256 of the bearer (an API token's hash as the database keeps
  it; a login session's ref as Redis keeps it): the cache never holds a
  credential. Bounded (``auth.cache_size``, least recently used out first)
  and short-lived (``auth.cache_ttl`` seconds, and never past the token's
  own expiry).
- Dropped at once, on every daemon sharing the Redis, when a token is
  revoked, a session ends, or a user is disabled, deleted, or has their role
  or password changed: the change publishes an event on
  ``{prefix}internal:principals``, and the daemon that made it drops its own
  entries before it answers.
- Trusted only while that channel is connected: when the pub/sub connection
  is down the cache is emptied and not used (an invalidation could be
  missed), so a revocation reaches every daemon within the channel's
  latency, or the cache TTL when PostgreSQL is down.
- A lookup that started before an invalidation does not store its result
  (a generation counter), so a revoked principal is never stored after the
  event that dropped it.
- Listeners (open WebSockets) hear every invalidation, from this daemon or
  another, so that a connection made with a credential follows it: closed
  when it is revoked, re-checked when its user's role changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import msgspec

from actors.data.model import Principal

if TYPE_CHECKING:  # a type only: the command line loads this without Redis's client
    from actors.pubsub import Delivery

__all__ = [
    "Invalidation",
    "PrincipalCache",
    "bearer_key",
    "encode_invalidation",
    "internal_channel",
]


def bearer_key(token: str) -> str:
    """SHA-256 hex of a bearer: a token's database hash, a session's ref."""
    return hashlib.sha256(token.encode()).hexdigest()


def internal_channel(prefix: str) -> str:
    return f"{prefix}internal:principals"


class Invalidation(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """What to forget: a user's every entry, one bearer, or everything."""

    kind: Literal["user", "bearer", "all"]
    user_id: int | None = None
    key: str | None = None  # bearer_key


@dataclass(slots=True)
class _Entry:
    principal: Principal
    expires: float  # monotonic
    touched: float  # monotonic: when a session was last slid in Redis


_decode = msgspec.json.Decoder(Invalidation).decode
_encode = msgspec.json.Encoder().encode


class PrincipalCache:
    def __init__(self, *, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self.enabled = False  # until the invalidation channel is connected
        self.generation = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._by_user: dict[int, set[str]] = {}
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        # Lookups in progress by key: callers with the same credentials wait
        # for the one lookup instead of each asking the database (a herd of
        # them would arrive together whenever a busy entry expires).
        # (Only while nothing was invalidated since it began: see auth.)
        self.lookups: dict[str, tuple[int, asyncio.Future[Principal]]] = {}
        self.coalesced = 0
        self.listeners: list[Callable[[Invalidation], None]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, key: str) -> bool:
        """Whether get() would answer from memory (counts nothing)."""
        entry = self._entries.get(key) if self.enabled else None
        return entry is not None and entry.expires > time.monotonic()

    def get(self, key: str) -> _Entry | None:
        if not self.enabled:
            return None
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires <= time.monotonic():
            self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(
        self, key: str, principal: Principal, generation: int, *, expires_at: float | None
    ) -> None:
        """Store a lookup's result, unless something was invalidated since
        the lookup began (``generation`` is what it read at its start)."""
        if not self.enabled or generation != self.generation:
            return
        now = time.monotonic()
        expires = now + self.ttl
        if expires_at is not None:  # the token's own expiry, as wall-clock seconds
            expires = min(expires, now + max(expires_at - time.time(), 0))
        self._drop(key)
        self._entries[key] = _Entry(principal, expires, now)
        if principal.user_id is not None:
            self._by_user.setdefault(principal.user_id, set()).add(key)
        while len(self._entries) > self.size:
            oldest = next(iter(self._entries))
            self._drop(oldest)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and entry.principal.user_id is not None:
            keys = self._by_user.get(entry.principal.user_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_user[entry.principal.user_id]

    def invalidate(self, what: Invalidation, *, notify: bool = True) -> None:
        """Forget what ``what`` names; with ``notify``, tell the listeners
        (a change to callers, not a reset of the cache itself)."""
        self.generation += 1
        self.invalidations += 1
        if what.kind == "all":
            self._entries.clear()
            self._by_user.clear()
        elif what.kind == "user" and what.user_id is not None:
            for key in list(self._by_user.get(what.user_id, ())):
                self._drop(key)
        elif what.kind == "bearer" and what.key is not None:
            self._drop(what.key)
        if notify:
            for listener in list(self.listeners):
                listener(what)

    def on_delivery(self, item: Delivery) -> bool:
        """The internal channel's subscriber (never refuses a delivery)."""
        if item.kind == "message":
            try:
                self.invalidate(_decode(item.data))
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.invalidate(Invalidation(kind="all"))  # unreadable: forget everything
        elif item.kind == "gap":
            # Reconnected: whatever was published meanwhile was missed.
            self.invalidate(Invalidation(kind="all"))
            self.enabled = True
        elif item.kind == "down":
            self.enabled = False
            self.invalidate(Invalidation(kind="all"), notify=False)
        return True

    def enable(self) -> None:
        """The invalidation channel is (again) subscribed: start afresh."""
        self.invalidate(Invalidation(kind="all"), notify=False)
        self.enabled = True

    def disable(self) -> None:
        """The invalidation channel is not (or no longer) connected."""
        self.enabled = False
        self.invalidate(Invalidation(kind="all"), notify=False)

    def stats(self) -> dict[str, int | bool]:
        return {
            "enabled": self.enabled,
            "entries": len(self._entries),
            "hits": self.hits,
            "misses": self.misses,
            "invalidations": self.invalidations,
            "coalesced": self.coalesced,
        }


def encode_invalidation(what: Invalidation) -> bytes:
    return _encode(what)
