"""The cache actor (``actor``): its messages and the reference that sends
them (``messages``), what loops over many keys in a lane of its own
(``scans``), its statistics (``stats``) and Lua scripts (``scripts``)."""

from actors.cache.actor import Cache
from actors.cache.messages import (
    CacheDelete,
    CacheError,
    CacheExists,
    CacheFlush,
    CacheGet,
    CacheInvalidatePattern,
    CacheInvalidateTags,
    CacheMessage,
    CacheRef,
    CacheSet,
    CacheStatsQuery,
    CacheUnavailable,
    clamp_ttl_ms,
)
from actors.cache.scans import glob_escape

__all__ = [
    "Cache",
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
    "clamp_ttl_ms",
    "glob_escape",
]
