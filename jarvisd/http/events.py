"""``GET /events``: the event log for clients without WebSockets, from the
outbox in PostgreSQL (DESIGN §5, §8).

``since`` is the last event id the client saw (0: from the oldest kept);
the answer holds the events after it, in id order, at most ``limit``, and
``next``, the id to ask from next time. With ``wait=N`` an answer that would
be empty waits up to N seconds for new events (woken by the events this
daemon hears on Redis; once a second while it hears nothing). ``gap`` is
true when events after ``since`` were pruned (``events.retention``): the
client missed some and should read the state again. Users see only events
about their own commands and requests, as on the event channels.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from actors import persistence as m
from actors.data.listing import parse_integer
from actors.data.model import JsonValue, Principal
from jarvisd.http.auth import require
from jarvisd.http.common import RouteDoc, actors_of, query_param
from jarvisd.http.errors import ProblemError, reject_unknown_params
from jarvisd.http.keys import RUNTIME, SHARES, release_admission
from jarvisd.http.shares import Full, principal_key

__all__ = ["ROUTES", "EventFeed"]

MAX_WAIT = 55
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


class EventFeed(msgspec.Struct, frozen=True):
    """What ``GET /events`` answers (for the API description)."""

    events: list[JsonValue]
    next: int
    gap: bool


def _number(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = query_param(request, name)
    value = default if raw is None else parse_integer(raw)
    if value is None or not low <= value <= high:
        raise ProblemError(400, "Bad request", f"{name} is a whole number from {low} to {high}")
    return value


@require()
async def event_feed(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ("since", "limit", "wait", "kind"))
    since = _number(request, "since", 0, 0, 2**63 - 1)
    limit = _number(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    wait = _number(request, "wait", 0, 0, MAX_WAIT)
    kind = query_param(request, "kind")
    if kind not in (None, "commands", "approvals"):
        raise ProblemError(400, "Bad request", "kind is commands or approvals")
    ask = m.ReadEvents(
        since=since,
        limit=limit,
        kind=kind,  # type: ignore[arg-type]
        user_id=who.user_id if who.role == "user" else None,
    )
    page = await actors_of(request).persistence.ask(ask)
    if page.items or wait == 0:
        return _answer(page, since)
    rt = request.app[RUNTIME]
    shares = request.app[SHARES]
    try:
        with shares.hold(
            shares.waiters,
            principal_key(who),
            rt.settings.approvals.max_waiters_per_principal,
            "approvals.max_waiters_per_principal",
        ):
            release_admission(request)  # waiting: capped per caller instead
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            while not page.items and not rt.draining:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # While the events channel is not heard, look once a second.
                await rt.lists.next_change(remaining if rt.lists.enabled else min(remaining, 1.0))
                page = await actors_of(request).persistence.ask(ask)
    except Full:
        return _answer(page, since, {"Jarvisd-Wait": "declined"})
    return _answer(page, since)


def _answer(page: m.EventPage, since: int, headers: dict[str, str] | None = None) -> web.Response:
    last = page.items[-1][0] if page.items else since
    gap = since < page.pruned_to
    body = b'{"events":[' + b",".join(event for _id, event in page.items) + b"]"
    body += b',"next":%d,"gap":%s}' % (last, b"true" if gap else b"false")
    return web.Response(body=body, content_type="application/json", headers=headers)


_QUERY: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("since", {"type": "integer", "minimum": 0}, "the last event id seen (0: the oldest kept)"),
    ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "at most this many"),
    ("wait", {"type": "integer", "minimum": 0, "maximum": MAX_WAIT}, "seconds to wait for one"),
    ("kind", {"type": "string", "enum": ["commands", "approvals"]}, "only events of this kind"),
)

ROUTES: list[RouteDoc] = [
    RouteDoc(
        "GET",
        "/events",
        event_feed,
        "Events after an id, from the durable log (a long-poll with wait)",
        response=EventFeed,
        query=_QUERY,
    ),
]
