"""The cache actor's messages, their input rules, and the reference that sends them.

Keys: ``{prefix}cache:{namespace}:{key}``; tag sets: ``{prefix}cache-tag:{namespace}:{tag}``.
Values are JSON (msgspec) unless given as bytes, which pass through raw.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

from actors.kernel import Message, Ref
from actors.redis_link import RedisUnavailable
from config import CacheSettings

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_TAGS",
    "CacheDelete",
    "CacheError",
    "CacheExists",
    "CacheFlush",
    "CacheGet",
    "CacheInvalidatePattern",
    "CacheInvalidateTags",
    "CacheMessage",
    "CacheRef",
    "CacheSet",
    "CacheStatsQuery",
    "CacheUnavailable",
    "check_key",
    "check_namespace",
    "clamp_ttl_ms",
]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)  # a message of a reply type is one of any wider type
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_KEY_BYTES = 4096
MAX_TAGS = 64
Mode = Literal["", "NX", "XX"]


class CacheError(ValueError):
    """Invalid cache input (namespace, key, TTL, tags): nothing was changed."""


class CacheUnavailable(RedisUnavailable):
    """Redis cannot be reached; the write did not happen."""


class CacheMessage(Message[R_co], frozen=True):
    """A message the cache actor answers with ``R``."""


# -- keys: pipelined, many to a round trip ---------------------------------------------------
class CacheGet(CacheMessage[tuple[bool, Any]], frozen=True):
    """Replies (hit, value); a cached null is a hit. Redis down: a miss."""

    namespace: str
    key: str
    raw: bool = False


class CacheSet(CacheMessage[bool], frozen=True):
    """Replies True if stored, False if NX/XX refused it."""

    namespace: str
    key: str
    value: Any
    ttl_ms: int | None = None  # None: cache.default_ttl (unless keepttl)
    mode: Mode = ""
    keepttl: bool = False
    tags: tuple[str, ...] = ()


class CacheDelete(CacheMessage[int], frozen=True):
    """Replies how many of the keys were there."""

    namespace: str
    keys: tuple[str, ...]


class CacheExists(CacheMessage[int], frozen=True):
    """Replies how many of the keys exist."""

    namespace: str
    keys: tuple[str, ...]


# -- what loops: a lane of its own -------------------------------------------------------------
class CacheInvalidateTags(CacheMessage[int], frozen=True):
    """Replies the number of keys removed."""

    namespace: str
    tags: tuple[str, ...]


class CacheInvalidatePattern(CacheMessage[int], frozen=True):
    """Glob over keys of the namespace; replies the number of keys removed."""

    namespace: str
    pattern: str


class CacheFlush(CacheMessage[int], frozen=True):
    """Remove every key and tag set of the namespace, and only those."""

    namespace: str


class CacheStatsQuery(CacheMessage[dict[str, Any]], frozen=True):
    """Replies {namespace: statistics}; with ``total``, {"all": the sum}:
    namespace names are the clients', so public routes see only the sum."""

    namespace: str | None = None
    total: bool = False


class CacheRef(Ref):
    """The cache actor."""

    async def ask(self, msg: CacheMessage[R], timeout: float | None = None) -> R:
        return await self._ask(msg, timeout)


# -- input rules -------------------------------------------------------------------------------
def clamp_ttl_ms(settings: CacheSettings, ttl_ms: int | None) -> int:
    """The TTL a set gets: the default when none is asked, at most cache.max_ttl."""
    ttl = settings.default_ttl * 1000 if ttl_ms is None else ttl_ms
    if ttl <= 0:
        raise CacheError("ttl must be positive")
    return min(ttl, settings.max_ttl * 1000)


def check_namespace(ns: str) -> None:
    if not NAMESPACE_RE.match(ns):
        raise CacheError(f"namespace {ns!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")


def check_key(key: str, what: str = "key") -> None:
    if not key:
        raise CacheError(f"{what} must not be empty")
    # At most 4 bytes a character: short keys need no encoding to be counted.
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode()) > MAX_KEY_BYTES:
        raise CacheError(f"{what} is longer than {MAX_KEY_BYTES} bytes")
