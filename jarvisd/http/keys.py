"""Typed application keys (aiohttp AppKey): no stringly-typed app state."""

from __future__ import annotations

import asyncio
import weakref

from aiohttp import web

from jarvisd.http.followers import Followers
from jarvisd.http.metrics import HttpMetrics
from jarvisd.http.shares import Shares
from jarvisd.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
HTTP_METRICS = web.AppKey("http_metrics", HttpMetrics)
# Open WebSockets, by the credential they follow.
FOLLOWERS = web.AppKey("followers", Followers)
# Per-user and per-address shares of sockets, subscriptions and long-polls.
SHARES = web.AppKey("shares", Shares)
# The transports of the connections requests came in on, watched for a peer
# that stops reading (each goes when its connection is gone).
TRANSPORTS = web.AppKey("transports", weakref.WeakSet[asyncio.BaseTransport])
# Set on a request counted against http.max_in_flight, until it gives its place back.
ADMITTED = web.RequestKey("admitted", bool)


def release_admission(request: web.Request) -> None:
    """A request about to wait long (a long-poll) stops counting against
    http.max_in_flight; long waits have caps of their own."""
    if request.get(ADMITTED):
        request[ADMITTED] = False
        request.app[HTTP_METRICS].admitted -= 1
