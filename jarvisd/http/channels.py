"""Which channels a caller may publish on, subscribe to and see (DESIGN §8).

| channels | admin | agent | approver | user |
|---|---|---|---|---|
| ``{prefix}events``, ``{prefix}commands``, ``{prefix}approvals`` | all events | all events | all events | events about their own commands and requests |
| ``pubsub.channels`` | yes | yes | - | - |
| other ``{prefix}…`` channels (the inboxes) | yes | - | - | - |
| patterns starting with ``{prefix}``, or listed in ``pubsub.channels`` | yes | yes | - | - |
| ``{prefix}internal:*``, any other channel | - | - | - | - |

Publishing (admins and agents): ``pubsub.channels`` only, never the
daemon's own channels: an event read from them is the daemon's, and an
envelope on an inbox is its agent's. A message matching a pattern on an
internal channel is never delivered.
"""

from __future__ import annotations

import fnmatch
import functools
from typing import Annotated

import msgspec

from actors.data.model import Principal
from actors.pubsub import Delivery
from jarvisd.runtime import Runtime

__all__ = ["CHANNEL_RE", "PATTERN_RE", "Channel", "Pattern", "Rules", "rules_of"]

CHANNEL_RE = r"^[A-Za-z0-9_.:@/-]{1,200}$"
PATTERN_RE = r"^[A-Za-z0-9_.:@/*?\[\]^-]{1,200}$"
Channel = Annotated[str, msgspec.Meta(pattern=CHANNEL_RE)]
Pattern = Annotated[str, msgspec.Meta(pattern=PATTERN_RE)]


class Rules:
    """What a caller may publish and see, from the daemon's settings: the
    daemon's event channels, and the pass-through channels ``pubsub.channels``
    allows. Nothing else of the Redis server is reachable through jarvisd:
    not the inboxes (agents write their own, on Redis), not the internal
    channels, not another instance's channels."""

    def __init__(self, rt: Runtime) -> None:
        prefix = rt.settings.redis.prefix
        self.prefix = prefix
        self.internal = f"{prefix}internal:"
        self.inbox = rt.settings.inbox
        self.event_channels = frozenset(f"{prefix}{k}" for k in ("events", "commands", "approvals"))
        self.allowlist = tuple(rt.settings.pubsub.channels)
        # A pattern that starts with the prefix matches only the daemon's
        # channels, unless the prefix itself holds glob characters.
        self.literal_prefix = not any(ch in prefix for ch in "*?[]\\")

    def allowed(self, channel: str) -> bool:
        return (
            not channel.startswith(self.prefix)
            and not channel.startswith(self.inbox)
            and _listed(channel, self.allowlist)
        )

    def may_publish(self, who: Principal, channel: str) -> bool:
        return who.role in ("admin", "agent") and self.allowed(channel)

    def may_subscribe(self, who: Principal, channel: str) -> bool:
        if channel.startswith(self.internal):
            return False
        if channel in self.event_channels:
            return True
        if who.role not in ("admin", "agent"):
            return False
        if channel.startswith(self.prefix):
            return who.role == "admin"  # the inboxes, as they pass
        return self.allowed(channel)

    def may_pattern(self, who: Principal, pattern: str) -> bool:
        if who.role not in ("admin", "agent"):
            return False
        return (self.literal_prefix and pattern.startswith(self.prefix)) or (
            pattern in self.allowlist
        )

    def may_see(self, who: Principal, item: Delivery) -> bool:
        channel = item.channel
        if channel.startswith(self.internal):
            return False
        if who.role == "user":
            # A user sees the daemon's events about themselves, nothing else.
            return channel in self.event_channels and _user_of(item.data) == who.user_id
        if channel in self.event_channels:
            return True
        if who.role not in ("admin", "agent"):
            return False
        if channel.startswith(self.prefix):
            return who.role == "admin"
        return self.allowed(channel)


_shared: tuple[object, Rules | None] = (None, None)


def rules_of(rt: Runtime) -> Rules:
    """The rules of the daemon's settings as they are now, shared by every
    socket made under them (a reload makes new ones for the sockets after)."""
    global _shared
    settings, rules = _shared
    if settings is not rt.settings or rules is None:
        rules = Rules(rt)
        _shared = (rt.settings, rules)
    return rules


@functools.lru_cache(maxsize=4096)
def _listed(channel: str, allowlist: tuple[str, ...]) -> bool:
    """Whether ``channel`` matches a glob of ``allowlist``: asked for each
    subscriber of each message, so remembered (names are short and capped)."""
    return any(fnmatch.fnmatchcase(channel, glob) for glob in allowlist)


class _UserOf(msgspec.Struct, rename="camel"):
    user_id: int | None = None


_user_decoder = msgspec.json.Decoder(_UserOf)


_last_user: tuple[bytes | None, int | None] = (None, None)


def _user_of(data: bytes) -> int | None:
    """The user an event is about. One message goes to all its subscribers
    in a row: decoded for the first, remembered for the others."""
    global _last_user
    if _last_user[0] is data:
        return _last_user[1]
    try:
        found = _user_decoder.decode(data).user_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        found = None
    _last_user = (data, found)
    return found
