"""Health and stats endpoints (DESIGN §8); /metrics is ``exposition``.

Readiness is computed from the actors' cached checks only: a health probe
never waits on a database, so it answers fast even while one hangs.
The document follows the "application/health+json" draft: ``status`` is
pass | warn | fail and ``checks`` maps each component to observations.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from actors.redis_link import RedisInfo, RedisUnavailable
from jarvisd.http import exposition
from jarvisd.http.errors import problem, reject_unknown_params
from jarvisd.http.keys import RUNTIME, SHARES
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


async def index(request: web.Request) -> web.Response:
    """``GET /``: what this is and where to go next (no authentication); a
    browser is sent on to the approvals console."""
    reject_unknown_params(request, set())
    if request.headers.get("Accept", "").startswith("text/html"):
        raise web.HTTPSeeOther("/console")
    doc = {
        "service": "jarvisd",
        "version": request.app[RUNTIME].version,
        "links": {
            "openapi": "/openapi.json",
            "health": "/health",
            "live": "/health/live",
            "metrics": "/metrics",
            "login": "/auth/login",
            "console": "/console",
            "websocket": "/ws",
        },
    }
    return web.Response(body=msgspec.json.encode(doc), content_type="application/json")


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


async def stats(request: web.Request) -> web.Response:
    reject_unknown_params(request, set())
    rt = request.app[RUNTIME]

    doc = stats_document(rt)
    doc["cache"] = await exposition.cache_stats(rt)
    doc["principals"] = rt.principals.stats()
    doc["shares"] = {"refused": request.app[SHARES].refused}
    doc["lists"] = rt.lists.stats()
    return web.Response(body=msgspec.json.encode(doc), content_type="application/json")


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
    info["cache"] = await exposition.cache_stats(rt)
    return web.json_response(info)


# (path, summary, query parameters, content types) for /openapi.json.
HEALTH_ROUTES: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("/", "What this is, and links to the API description and health", (), ("application/json",)),
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
    app.router.add_get("/", index)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/health", ready)
    app.router.add_get("/stats", stats)
    app.router.add_get("/metrics", exposition.metrics)
    app.router.add_get("/redis/health", redis_health)
    app.router.add_get("/redis/stats", redis_stats)
