"""Prometheus text exposition (format 0.0.4), written by hand: a handful of
families does not justify a dependency. Label values are bounded (route
templates, not paths), so no series grows without bound."""

from __future__ import annotations

import os
import resource
import time
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["HttpMetrics", "MetricsWriter", "process_metrics", "prom_number"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def prom_number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class MetricsWriter:
    """Collects families in order and renders them; one HELP/TYPE per family."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._seen: set[str] = set()

    def family(self, name: str, kind: str, help_text: str) -> None:
        if name in self._seen:
            return
        self._seen.add(name)
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self._lines.append(f"{name}{_labels(labels or {})} {prom_number(value)}")

    def metric(
        self,
        name: str,
        kind: str,
        help_text: str,
        value: float,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value, labels)

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1


class HttpMetrics:
    """Request counts by (method, route, status) and latency by route."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.in_flight = 0
        self.admitted = 0  # in flight and counted against http.max_in_flight
        self.refused = 0  # answered 503 for being over it (or another in-flight cap)
        self.guarded = 0  # health requests in a token lookup (http.public_health = false)
        self.websockets = 0
        self.websockets_unauthenticated = 0  # waiting for their first frame
        self.stalled_closed = 0  # aborted: unsent bytes stuck for http.idle_timeout

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        # Clients choose methods: any outside the known set counts as "other",
        # so no client can add series.
        key = (method if method in KNOWN_METHODS else "other", route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.setdefault(route, _Histogram()).observe(seconds)

    def write(self, out: MetricsWriter) -> None:
        out.family(
            "jarvisd_http_requests_total",
            "counter",
            "HTTP requests handled, by method, route and status.",
        )
        for (method, route, status), count in sorted(self.requests.items()):
            out.sample(
                "jarvisd_http_requests_total",
                count,
                {"method": method, "route": route, "status": status},
            )
        out.metric(
            "jarvisd_http_requests_in_flight",
            "gauge",
            "HTTP requests being handled now.",
            self.in_flight,
        )
        out.metric(
            "jarvisd_http_overload_refused_total",
            "counter",
            "Requests and WebSocket upgrades answered 503 for being over a cap: "
            "http.max_in_flight, http.max_websockets (a tenth of it for clients yet "
            "to authenticate), 64 health requests waiting for a token lookup.",
            self.refused,
        )
        out.metric(
            "jarvisd_http_stalled_closed_total",
            "counter",
            "Connections aborted because their unsent bytes did not go down for http.idle_timeout.",
            self.stalled_closed,
        )
        out.metric(
            "jarvisd_websocket_clients",
            "gauge",
            "WebSocket clients connected now.",
            self.websockets,
        )
        out.metric(
            "jarvisd_websocket_clients_unauthenticated",
            "gauge",
            "WebSocket clients connected now that have yet to send their credentials.",
            self.websockets_unauthenticated,
        )
        name = "jarvisd_http_request_duration_seconds"
        out.family(name, "histogram", "HTTP request latency in seconds, by route.")
        for route, hist in sorted(self.latency.items()):
            cumulative = 0
            bounds: Iterable[float] = (*LATENCY_BUCKETS, float("inf"))
            for bound, count in zip(bounds, hist.counts, strict=True):
                cumulative += count
                out.sample(f"{name}_bucket", cumulative, {"route": route, "le": prom_number(bound)})
            out.sample(f"{name}_sum", hist.total, {"route": route})
            out.sample(f"{name}_count", hist.n, {"route": route})


_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _boot_time() -> float:
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def process_metrics(out: MetricsWriter) -> None:
    """The standard process_* families, read from /proc (Linux)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.metric(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        round(usage.ru_utime + usage.ru_stime, 6),
    )
    try:
        with open("/proc/self/statm") as fh:
            vm_pages, rss_pages = (int(x) for x in fh.read().split()[:2])
        out.metric(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            vm_pages * _PAGE,
        )
        out.metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss_pages * _PAGE,
        )
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        boot = _boot_time()  # unknown when /proc/stat is hidden (ProcSubset=pid)
        if boot:
            out.metric(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                round(boot + start_ticks / _CLK_TCK, 3),
            )
        out.metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            len(os.listdir("/proc/self/fd")),
        )
    except (OSError, ValueError, IndexError):
        pass
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out.metric("process_max_fds", "gauge", "Maximum number of open file descriptors.", soft)
    out.metric(
        "jarvisd_scrape_timestamp_seconds",
        "gauge",
        "When this scrape was rendered.",
        round(time.time(), 3),
    )
