"""Typed application keys (aiohttp AppKey): no stringly-typed app state."""

from __future__ import annotations

from aiohttp import web

from jarvisd.http.metrics import HttpMetrics
from jarvisd.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
HTTP_METRICS = web.AppKey("http_metrics", HttpMetrics)
