"""The cache's statistics per namespace (DESIGN §7): hits, misses, sets,
NX/XX refused, deletes, invalidated keys, errors, latency."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LATENCY_BUCKETS", "OTHER_NAMESPACES", "NamespaceStats", "StatsTable"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# The statistics entry shared by namespaces past cache.max_namespaces; not a
# valid namespace name, so no client can write under it.
OTHER_NAMESPACES = "(other)"


@dataclass
class NamespaceStats:
    hits: int = 0
    misses: int = 0
    sets: int = 0
    nx_refused: int = 0
    xx_refused: int = 0
    deletes: int = 0
    invalidated: int = 0
    errors: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    latency_count: int = 0

    def observe(self, seconds: float) -> None:
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def add(self, other: NamespaceStats) -> None:
        for name in (
            "hits",
            "misses",
            "sets",
            "nx_refused",
            "xx_refused",
            "deletes",
            "invalidated",
            "errors",
            "latency_sum",
            "latency_count",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency_buckets = [
            a + b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)
        ]

    def document(self) -> dict[str, Any]:
        reads = self.hits + self.misses
        cumulative, buckets = 0, {}
        for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), self.latency_buckets, strict=True):
            cumulative += count
            buckets[str(bound)] = cumulative
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hitRatio": round(self.hits / reads, 4) if reads else None,
            "sets": self.sets,
            "nxRefused": self.nx_refused,
            "xxRefused": self.xx_refused,
            "deletes": self.deletes,
            "invalidated": self.invalidated,
            "errors": self.errors,
            "latency": {
                "count": self.latency_count,
                "sumSeconds": round(self.latency_sum, 6),
                "buckets": buckets,
            },
        }


class StatsTable:
    """The counters of every namespace seen. Namespaces are client-chosen
    names: past ``limit()`` new ones share one entry, so memory, /stats and
    /metrics stay bounded whatever names clients send."""

    def __init__(self, limit: Any) -> None:
        self._limit = limit  # () -> int: cache.max_namespaces, as reloaded
        self.by_ns: dict[str, NamespaceStats] = {}

    def of(self, ns: str) -> NamespaceStats:
        stats = self.by_ns.get(ns)
        if stats is None:
            if len(self.by_ns) >= self._limit():
                ns = OTHER_NAMESPACES
                stats = self.by_ns.get(ns)
            if stats is None:
                stats = self.by_ns[ns] = NamespaceStats()
        return stats

    def document(self, ns: str | None = None, *, total: bool = False) -> dict[str, Any]:
        if total:
            summed = NamespaceStats()
            for one in self.by_ns.values():
                summed.add(one)
            return {"all": summed.document()}
        if ns is not None:
            found = self.by_ns.get(ns)
            return {ns: (found or NamespaceStats()).document()}
        return {name: s.document() for name, s in sorted(self.by_ns.items())}
