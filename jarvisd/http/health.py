"""Health, stats and metrics endpoints (DESIGN §8).

Readiness is computed from the actors' cached checks only: a health probe
never waits on a database, so it answers fast even while one hangs.
The document follows the "application/health+json" draft: ``status`` is
pass | warn | fail and ``checks`` maps each component to observations.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from actors import ActorError
from actors.cache import CacheStatsQuery
from actors.redis_link import RedisInfo, RedisUnavailable
from jarvisd.http.errors import problem, reject_unknown_params
from jarvisd.http.keys import HTTP_METRICS, RUNTIME, SHARES
from jarvisd.http.metrics import CONTENT_TYPE, MetricsWriter, process_metrics
from jarvisd.runtime import Runtime

HEALTH_JSON = "application/health+json"
# A mailbox fuller than this fraction makes readiness "warn".
MAILBOX_WARN = 0.8


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def readiness(rt: Runtime) -> dict[str, Any]:
    """The readiness document, built from cached actor health only."""
    checks: dict[str, list[dict[str, Any]]] = {}
    worst = "pass"

    def degrade(status: str) -> None:
        nonlocal worst
        if status == "fail" or (status == "warn" and worst == "pass"):
            worst = status

    for check in rt.checks:
        h = check.actor.health()
        entry: dict[str, Any] = {
            "componentId": check.actor.name,
            "componentType": check.component_type,
            "status": h.status,
            "time": _iso(h.checked_at or time.time()),
        }
        if h.observed_ms is not None:
            entry.update(observedValue=h.observed_ms, observedUnit="ms")
        if h.detail:
            entry["output"] = h.detail
        checks[f"{check.name}"] = [entry]
        degrade(h.status if check.critical else ("warn" if h.status == "fail" else h.status))

    depth_entries = []
    for actor in rt.supervisor.actors:
        fill = actor.mailbox_depth / actor.mailbox_size
        status = "warn" if fill >= MAILBOX_WARN else "pass"
        degrade(status)
        depth_entries.append(
            {
                "componentId": actor.name,
                "componentType": "component",
                "status": status,
                "observedValue": actor.mailbox_depth,
                "observedUnit": "messages",
            }
        )
    checks["mailboxes"] = depth_entries
    if rt.draining:
        checks["daemon"] = [
            {"componentType": "system", "status": "fail", "output": "draining: shutting down"}
        ]
        worst = "fail"
    return {
        "status": worst,
        "version": "1",
        "releaseId": rt.version,
        "serviceId": "jarvisd",
        "description": "jarvisd state daemon",
        "checks": checks,
    }


def _verbose(doc: dict[str, Any]) -> str:
    lines = []
    for name, entries in doc["checks"].items():
        for e in entries:
            label = name if len(entries) == 1 else f"{name}:{e.get('componentId', '')}"
            if e["status"] == "pass":
                lines.append(f"[+]{label} ok")
            else:
                lines.append(f"[-]{label} {e['status']}: {e.get('output', '')}".rstrip(": "))
    verdict = {"pass": "ready", "warn": "ready (degraded)", "fail": "not ready"}[doc["status"]]
    lines.append(f"{verdict}: {doc['status']}")
    return "\n".join(lines) + "\n"


def _health_response(doc: dict[str, Any], request: web.Request) -> web.Response:
    code = 503 if doc["status"] == "fail" else 200
    if "verbose" in request.query:
        return web.Response(status=code, text=_verbose(doc), content_type="text/plain")
    return web.Response(status=code, body=msgspec.json.encode(doc), content_type=HEALTH_JSON)


async def live(request: web.Request) -> web.Response:
    """In-process only: the event loop answers. Never touches a dependency."""
    reject_unknown_params(request, set())
    rt = request.app[RUNTIME]
    doc = {
        "status": "pass",
        "version": "1",
        "releaseId": rt.version,
        "serviceId": "jarvisd",
        "output": f"pid {os.getpid()}, up {rt.uptime:.1f}s",
    }
    return web.Response(body=msgspec.json.encode(doc), content_type=HEALTH_JSON)


# The readiness document is built from cached checks anyway: building and
# encoding it once per READY_MEMO seconds (or when the daemon starts to drain)
# serves a busy poller without work per request.
READY_MEMO = 0.1


def _memo_ready(rt: Runtime) -> tuple[int, bytes, dict[str, Any]]:
    now = time.monotonic()
    memo = rt.ready_memo
    if memo is None or now - memo[0] > READY_MEMO or memo[1] != rt.draining:
        doc = readiness(rt)
        code = 503 if doc["status"] == "fail" else 200
        memo = rt.ready_memo = (now, rt.draining, code, msgspec.json.encode(doc), doc)
    return memo[2], memo[3], memo[4]


async def ready(request: web.Request) -> web.Response:
    reject_unknown_params(request, {"verbose"})
    rt = request.app[RUNTIME]
    if "verbose" in request.query:
        return _health_response(readiness(rt), request)
    code, body, _doc = _memo_ready(rt)
    return web.Response(status=code, body=body, content_type=HEALTH_JSON)


def stats_document(rt: Runtime) -> dict[str, Any]:
    actors = rt.supervisor.snapshot()
    return {
        "service": "jarvisd",
        "daemon": rt.name,
        "version": rt.version,
        "pid": os.getpid(),
        "startedAt": _iso(rt.started_at),
        "uptimeSeconds": round(rt.uptime, 3),
        "draining": rt.draining,
        "status": readiness(rt)["status"],
        "actors": actors,
        "restartsTotal": sum(a["restarts"] for a in actors.values()),
    }


async def cache_stats(rt: Runtime) -> dict[str, Any] | None:
    """The cache's statistics summed over namespaces: namespaces are names
    clients chose, told per namespace only on GET /cache/stats (with a token)."""
    try:
        return await rt.cache.ask(CacheStatsQuery(total=True))
    except ActorError:
        return None


async def stats(request: web.Request) -> web.Response:
    reject_unknown_params(request, set())
    rt = request.app[RUNTIME]

    doc = stats_document(rt)
    doc["cache"] = await cache_stats(rt)
    doc["principals"] = rt.principals.stats()
    doc["shares"] = {"refused": request.app[SHARES].refused}
    doc["lists"] = rt.lists.stats()
    return web.Response(body=msgspec.json.encode(doc), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    reject_unknown_params(request, set())
    rt = request.app[RUNTIME]
    out = MetricsWriter()
    process_metrics(out)
    out.metric(
        "jarvisd_up",
        "gauge",
        "1 while the daemon runs.",
        1,
        {"version": rt.version, "daemon": rt.name},
    )
    for key, value in rt.principals.stats().items():
        gauge = key in ("enabled", "entries")
        out.metric(
            f"jarvisd_principal_cache_{key}" + ("" if gauge else "_total"),
            "gauge" if gauge else "counter",
            f"Principal cache: {key}.",
            value,
        )
    out.metric(
        "jarvisd_uptime_seconds", "gauge", "Seconds since the daemon started.", round(rt.uptime, 3)
    )
    out.metric(
        "jarvisd_draining", "gauge", "1 while the daemon drains for shutdown.", int(rt.draining)
    )
    families: list[tuple[str, str, str, Callable[[dict[str, Any]], float]]] = [
        (
            "jarvisd_actor_mailbox_depth",
            "gauge",
            "Messages waiting in the actor's mailbox.",
            lambda s: s["mailbox"]["depth"],
        ),
        (
            "jarvisd_actor_mailbox_capacity",
            "gauge",
            "Bound of the actor's mailbox.",
            lambda s: s["mailbox"]["size"],
        ),
        (
            "jarvisd_actor_restarts_total",
            "counter",
            "Restarts of the actor by its supervisor.",
            lambda s: s["restarts"],
        ),
        ("jarvisd_actor_crashes_total", "counter", "Crashes of the actor.", lambda s: s["crashes"]),
        (
            "jarvisd_actor_messages_total",
            "counter",
            "Messages the actor handled.",
            lambda s: s["processed"],
        ),
        (
            "jarvisd_actor_up",
            "gauge",
            "1 when the actor is running.",
            lambda s: int(s["state"] == "running"),
        ),
    ]
    snapshot = rt.supervisor.snapshot()
    for name, kind, help_text, pick in families:
        out.family(name, kind, help_text)
        for actor, snap in snapshot.items():
            out.sample(name, pick(snap), {"actor": actor})
    out.family("jarvisd_health_check_up", "gauge", "1 when the component's last check passed.")
    out.family(
        "jarvisd_health_check_latency_seconds", "gauge", "Latency of the component's last check."
    )
    for check in rt.checks:
        h = check.actor.health()
        out.sample("jarvisd_health_check_up", int(h.status == "pass"), {"check": check.name})
        if h.observed_ms is not None:
            out.sample(
                "jarvisd_health_check_latency_seconds",
                round(h.observed_ms / 1000, 6),
                {"check": check.name},
            )
    request.app[HTTP_METRICS].write(out)
    write_cache_metrics(out, await cache_stats(rt) or {})
    for snap in snapshot.values():
        for section, exported in _SECTION_METRICS.items():
            values = snap.get(section)
            if values is None:
                continue
            for key, metric_name, metric_kind, metric_help in exported:
                value = values.get(key)
                if value is not None:
                    out.metric(metric_name, metric_kind, metric_help, value)
    return web.Response(text=out.render(), headers={"Content-Type": CONTENT_TYPE})


# Actor snapshot sections exported as they are: (key, metric, type, help).
_SECTION_METRICS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "pubsub": (
        ("connected", "jarvisd_pubsub_connected", "gauge", "1 while the pub/sub connection is up."),
        ("subscribers", "jarvisd_pubsub_subscribers", "gauge", "Local subscribers."),
        ("channels", "jarvisd_pubsub_channels", "gauge", "Channels subscribed on Redis."),
        ("patterns", "jarvisd_pubsub_patterns", "gauge", "Patterns subscribed on Redis."),
        ("received", "jarvisd_pubsub_received_total", "counter", "Messages received from Redis."),
        (
            "delivered",
            "jarvisd_pubsub_delivered_total",
            "counter",
            "Messages put on subscribers' queues.",
        ),
        (
            "droppedMessages",
            "jarvisd_pubsub_dropped_messages_total",
            "counter",
            "Messages an internal subscriber had no room for.",
        ),
        (
            "droppedSubscribers",
            "jarvisd_pubsub_dropped_subscribers_total",
            "counter",
            "Subscribers (WebSocket clients) dropped for being too slow.",
        ),
        (
            "published",
            "jarvisd_pubsub_published_total",
            "counter",
            "Messages published for clients.",
        ),
        (
            "eventsPublished",
            "jarvisd_events_published_total",
            "counter",
            "Events published by the daemon.",
        ),
        (
            "publishErrors",
            "jarvisd_pubsub_publish_errors_total",
            "counter",
            "Messages and events that could not be published.",
        ),
        (
            "reconnects",
            "jarvisd_pubsub_reconnects_total",
            "counter",
            "Pub/sub connections replaced.",
        ),
        ("gaps", "jarvisd_pubsub_gaps_total", "counter", "subscription.gap notices sent."),
    ),
    "bus": (
        ("read", "jarvisd_bus_read_total", "counter", "Inbox entries read (deliveries)."),
        ("acked", "jarvisd_bus_acked_total", "counter", "Inbox entries acknowledged."),
        (
            "dead",
            "jarvisd_bus_dead_letters_total",
            "counter",
            "Envelopes moved to the dead-letter stream.",
        ),
        (
            "retried",
            "jarvisd_bus_retried_total",
            "counter",
            "Deliveries left pending to be retried.",
        ),
        ("claimed", "jarvisd_bus_claimed_total", "counter", "Entries claimed from idle consumers."),
        (
            "publishedIn",
            "jarvisd_bus_published_in_total",
            "counter",
            "Envelopes received by PUBLISH.",
        ),
        ("trimmed", "jarvisd_bus_trimmed_total", "counter", "Inbox entries trimmed."),
        (
            "outages",
            "jarvisd_bus_outages_total",
            "counter",
            "Batches held back while a dependency was down.",
        ),
        ("pending", "jarvisd_bus_pending", "gauge", "Entries delivered and not yet acknowledged."),
        ("lag", "jarvisd_bus_lag", "gauge", "Entries not yet delivered to the group."),
    ),
}

_CACHE_COUNTERS = (
    (
        "hits",
        "jarvisd_cache_hits_total",
        "Cache reads that found a value (a cached null included).",
    ),
    (
        "misses",
        "jarvisd_cache_misses_total",
        "Cache reads that found nothing (or could not reach Redis).",
    ),
    ("sets", "jarvisd_cache_sets_total", "Values stored."),
    ("nxRefused", "jarvisd_cache_nx_refused_total", "NX sets refused because the key existed."),
    ("xxRefused", "jarvisd_cache_xx_refused_total", "XX sets refused because the key was missing."),
    ("deletes", "jarvisd_cache_deletes_total", "Keys deleted."),
    ("invalidated", "jarvisd_cache_invalidated_total", "Keys removed by tag, pattern or flush."),
    ("errors", "jarvisd_cache_errors_total", "Cache operations that failed on Redis."),
)


def write_cache_metrics(out: MetricsWriter, stats: dict[str, Any]) -> None:
    for field, name, help_text in _CACHE_COUNTERS:
        out.family(name, "counter", help_text)
        for ns, doc in stats.items():
            out.sample(name, doc[field], {"namespace": ns})
    name = "jarvisd_cache_operation_duration_seconds"
    out.family(
        name,
        "histogram",
        "Latency of cache operations (one pipeline round trip), all namespaces together.",
    )
    for ns, doc in stats.items():
        for bound, count in doc["latency"]["buckets"].items():
            out.sample(f"{name}_bucket", count, {"namespace": ns, "le": bound})
        out.sample(f"{name}_sum", doc["latency"]["sumSeconds"], {"namespace": ns})
        out.sample(f"{name}_count", doc["latency"]["count"], {"namespace": ns})


async def redis_health(request: web.Request) -> web.Response:
    reject_unknown_params(request, {"verbose"})
    rt = request.app[RUNTIME]
    checks = [c for c in rt.checks if c.name in ("redis", "embedded-valkey")]
    h = [c.actor.health() for c in checks]
    status = "fail" if any(x.status == "fail" for x in h) else "pass"
    doc = {
        "status": status,
        "serviceId": "jarvisd",
        "checks": {
            c.name: [
                {
                    "status": x.status,
                    "output": x.detail,
                    "observedValue": x.observed_ms,
                    "observedUnit": "ms",
                }
            ]
            for c, x in zip(checks, h, strict=True)
        },
    }
    return _health_response(doc, request)


async def redis_stats(request: web.Request) -> web.Response:
    reject_unknown_params(request, set())
    rt = request.app[RUNTIME]
    try:
        info = await rt.redis.ask(RedisInfo())
    except RedisUnavailable as exc:
        return problem(503, "Redis unavailable", str(exc))
    info["cache"] = await cache_stats(rt)
    return web.json_response(info)


# (path, summary, query parameters, content types) for /openapi.json.
HEALTH_ROUTES: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("/health/live", "Liveness: the process answers", (), (HEALTH_JSON,)),
    (
        "/health/ready",
        "Readiness (503 when failing or draining; ?verbose for text)",
        ("verbose",),
        (HEALTH_JSON, "text/plain"),
    ),
    ("/health", "The readiness document", ("verbose",), (HEALTH_JSON, "text/plain")),
    ("/stats", "Daemon statistics (JSON)", (), ("application/json",)),
    ("/metrics", "Prometheus text exposition 0.0.4", (), ("text/plain",)),
    ("/redis/health", "Redis reachability", ("verbose",), (HEALTH_JSON, "text/plain")),
    ("/redis/stats", "Redis server facts and cache statistics", (), ("application/json",)),
]


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/health", ready)
    app.router.add_get("/stats", stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/redis/health", redis_health)
    app.router.add_get("/redis/stats", redis_stats)
