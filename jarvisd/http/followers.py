"""Open WebSockets follow the credential they were opened with (DESIGN §8).

A WebSocket is authenticated once, at its start, and may stay open for days.
Each one is kept here by its user and its bearer's key; every invalidation
the caller cache hears — a token revoked, a logout, a user disabled, deleted
or given another role, on this daemon or any other sharing the Redis — makes
the sockets it names check their credential again at once: one that is no
longer valid is closed (1008), one whose role changed has its subscriptions
checked again. While the invalidation channel was away (a gap), every socket
checks.
"""

from __future__ import annotations

from typing import Any, Protocol

import structlog

from jarvisd.principals import Invalidation, PrincipalCache

__all__ = ["Follower", "Followers"]

log = structlog.get_logger("jarvisd", actor="http")


class Follower(Protocol):
    """An open socket: its user and bearer key (None: the local admin, whose
    peer credentials cannot be revoked), and how to check again."""

    user_id: int | None
    key: str | None

    def recheck_soon(self) -> None: ...


class Followers:
    def __init__(self, principals: PrincipalCache) -> None:
        self.by_user: dict[int, set[Follower]] = {}
        self.by_key: dict[str, set[Follower]] = {}
        self.rechecks = 0
        principals.listeners.append(self._heard)

    def __len__(self) -> int:
        return sum(len(s) for s in self.by_key.values())

    def add(self, f: Follower) -> None:
        if f.key is None:
            return
        self.by_key.setdefault(f.key, set()).add(f)
        if f.user_id is not None:
            self.by_user.setdefault(f.user_id, set()).add(f)

    def remove(self, f: Follower) -> None:
        if f.key is not None:
            _discard(self.by_key, f.key, f)
        if f.user_id is not None:
            _discard(self.by_user, f.user_id, f)

    def _heard(self, what: Invalidation) -> None:
        if what.kind == "all":
            named: set[Follower] = {f for group in self.by_key.values() for f in group}
        elif what.kind == "user" and what.user_id is not None:
            named = set(self.by_user.get(what.user_id, ()))
        elif what.kind == "bearer" and what.key is not None:
            named = set(self.by_key.get(what.key, ()))
        else:
            return
        for f in named:
            self.rechecks += 1
            try:
                f.recheck_soon()
            except Exception:  # one socket's fault: the others are still told
                log.exception("ws_recheck_not_started")


def _discard(index: dict[Any, set[Follower]], name: Any, f: Follower) -> None:
    group = index.get(name)
    if group is not None:
        group.discard(f)
        if not group:
            del index[name]
