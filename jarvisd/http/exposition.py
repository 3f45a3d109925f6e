"""``GET /metrics``: the daemon in Prometheus text exposition 0.0.4 (DESIGN §8):
the process, each actor's mailbox and counters, HTTP, the cache, the bus."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from actors import ActorError
from actors.cache import CacheStatsQuery
from actors.persistence import AGE_BUCKETS
from jarvisd.http.errors import reject_unknown_params
from jarvisd.http.keys import HTTP_METRICS, RUNTIME
from jarvisd.http.metrics import CONTENT_TYPE, MetricsWriter, process_metrics, prom_number
from jarvisd.runtime import Runtime

__all__ = ["cache_stats", "metrics", "write_cache_metrics"]


async def cache_stats(rt: Runtime) -> dict[str, Any] | None:
    """The cache's statistics summed over namespaces: namespaces are names
    clients chose, told per namespace only on GET /cache/stats (with a token)."""
    try:
        return await rt.cache.ask(CacheStatsQuery(total=True))
    except ActorError:
        return None


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
        write_event_metrics(out, snap)
    write_approval_metrics(out, snapshot)
    return web.Response(text=out.render(), headers={"Content-Type": CONTENT_TYPE})


def write_event_metrics(out: MetricsWriter, snap: dict[str, Any]) -> None:
    """The relay's lag and the webhooks, each endpoint by its configured name
    (names come from the config file: bounded)."""
    relay = snap.get("relay")
    if relay is not None:
        out.family(
            "jarvisd_relay_lag_seconds",
            "gauge",
            "Commit to Redis PUBLISH, over the newest events this daemon relayed.",
        )
        for q, key in (("0.5", "lagMsP50"), ("0.99", "lagMsP99")):
            if relay.get(key) is not None:
                out.sample("jarvisd_relay_lag_seconds", relay[key] / 1000, {"quantile": q})
        out.metric(
            "jarvisd_relay_leader", "gauge", "1 while this daemon relays.", int(relay["leader"])
        )
    hooks = snap.get("webhooks")
    if hooks is None:
        return
    for key, name, kind, text in _WEBHOOK_METRICS:
        out.family(name, kind, text)
        for ep in hooks["endpoints"]:
            value = ep[key] if key != "state" else int(ep["state"] == "dead")
            out.sample(name, value, {"webhook": ep["name"]})


def write_approval_metrics(out: MetricsWriter, snapshot: dict[str, Any]) -> None:
    """Time from request to decision (the decisions made on this daemon, by
    outcome) and the age of the pending requests (as the database has them)."""
    bounds = [*(prom_number(b) for b in AGE_BUCKETS), "+Inf"]
    decisions = "jarvisd_approval_decision_seconds"
    out.family(decisions, "histogram", "Seconds from request to decision, by outcome.")
    for snap in snapshot.values():
        for outcome, hist in sorted((snap.get("approvalDecisions") or {}).items()):
            _histogram(out, decisions, hist, bounds, {"outcome": outcome})
    ages = "jarvisd_approval_pending_age_seconds"
    out.family(ages, "histogram", "Age of the pending approval requests, in seconds.")
    for snap in snapshot.values():
        hist = (snap.get("approvals") or {}).get("pendingAges")
        if hist is not None:
            _histogram(out, ages, hist, bounds, {})


def _histogram(
    out: MetricsWriter, name: str, hist: dict[str, Any], bounds: list[str], labels: dict[str, str]
) -> None:
    for bound, count in zip(bounds, hist["buckets"], strict=True):
        out.sample(f"{name}_bucket", count, {**labels, "le": bound})
    out.sample(f"{name}_sum", hist["sum"], labels or None)
    out.sample(f"{name}_count", hist["count"], labels or None)


_WEBHOOK_METRICS = (
    ("delivered", "jarvisd_webhook_delivered_total", "counter", "Events the endpoint took (2xx)."),
    ("failures", "jarvisd_webhook_failures_total", "counter", "Failed delivery attempts."),
    ("attempts", "jarvisd_webhook_attempts", "gauge", "Failed attempts at the next event."),
    ("state", "jarvisd_webhook_dead", "gauge", "1 while the endpoint is marked dead."),
    ("lastId", "jarvisd_webhook_last_id", "gauge", "Every event up to this id is done."),
    ("gaps", "jarvisd_webhook_gaps_total", "counter", "Times events were pruned before delivery."),
)

# Actor snapshot sections exported as they are: (key, metric, type, help).
_SECTION_METRICS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "relay": (
        ("relayed", "jarvisd_relay_events_total", "counter", "Events this daemon relayed."),
        ("lastId", "jarvisd_relay_last_id", "gauge", "The last event id relayed."),
        ("newestId", "jarvisd_relay_newest_id", "gauge", "The newest event id seen."),
        ("pruned", "jarvisd_events_pruned_total", "counter", "Events pruned after retention."),
        ("failures", "jarvisd_relay_failures_total", "counter", "Relay batches that failed."),
    ),
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
