"""What the webhooks actor is asked (``jarvisd webhooks``, ``/webhooks``)
and what it answers."""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar

import msgspec

from actors.kernel import Message, Ref

__all__ = ["ListWebhooks", "RetryWebhook", "WebhookInfo", "WebhookMessage", "WebhooksRef"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class WebhookMessage(Message[R_co], frozen=True):
    """A message the webhooks actor answers with ``R``."""


class WebhookInfo(msgspec.Struct, frozen=True, rename="camel"):
    name: str
    url: str  # the host only when the path may be a secret
    format: str
    types: list[str]
    state: str  # new (nothing done yet), live, retrying, dead
    last_id: int  # every event up to this id is done
    delivered: int
    failures: int  # failed attempts, all told
    attempts: int  # failed attempts at the next event
    max_attempts: int
    last_status: int | None
    last_error: str | None
    gaps: int  # times events were pruned before this endpoint got them
    updated_at: datetime | None


class ListWebhooks(WebhookMessage[list[WebhookInfo]], frozen=True):
    """Every configured endpoint and how far it got."""


class RetryWebhook(WebhookMessage[WebhookInfo], frozen=True):
    """Send again, now: a dead endpoint goes live at the event it stopped at."""

    name: str


class WebhooksRef(Ref):
    """The webhooks: their state, and retrying one."""

    async def ask(self, msg: WebhookMessage[R], timeout: float | None = None) -> R:
        return await self._ask(msg, timeout)
