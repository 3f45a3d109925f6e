"""``/webhooks`` (admins): the ``[[webhooks]]`` endpoints, how far each got
in the event log, and sending again to one that was marked dead.

``GET /webhooks`` lists every configured endpoint (state new, live,
retrying or dead). ``POST /webhooks/{name}/retry`` makes a dead endpoint
live at the event it stopped at (and a retrying one try now). A name that
is not configured is a 404.
"""

from __future__ import annotations

import re

from aiohttp import web

from actors.data.model import Principal
from actors.outbox import ListWebhooks, RetryWebhook, WebhookInfo
from jarvisd.http.auth import require
from jarvisd.http.common import RouteDoc, actors_of, reply
from jarvisd.http.errors import ProblemError, reject_unknown_params

__all__ = ["ROUTES"]


@require("admin")
async def list_webhooks(request: web.Request, _who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    return reply(await actors_of(request).webhooks.ask(ListWebhooks()))


@require("admin")
async def retry_webhook(request: web.Request, _who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    name = request.match_info["name"]
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", name):
        raise ProblemError(404, "Not found", "no such webhook")
    return reply(await actors_of(request).webhooks.ask(RetryWebhook(name=name)))


ROUTES: list[RouteDoc] = [
    RouteDoc(
        "GET",
        "/webhooks",
        list_webhooks,
        "List the webhook endpoints and how far each got",
        response=list[WebhookInfo],
    ),
    RouteDoc(
        "POST",
        "/webhooks/{name}/retry",
        retry_webhook,
        "Send again to a dead webhook endpoint, from the event it stopped at",
        response=WebhookInfo,
    ),
]
