"""One webhook endpoint as the webhooks actor keeps it (its settings, its
task, its row as last seen), and how it is shown: whole to admins
(``/webhooks``), as states and counts where anyone may look (``/stats``)."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from actors.outbox.hooks import matcher
from actors.outbox.webhook_messages import WebhookInfo
from config import WebhookSettings
from config.webhooks import shown_url

__all__ = ["Endpoint"]

# What /stats shows of an endpoint: /stats may be open to anyone
# (http.public_health); URLs and errors are for admins (/webhooks).
_STATS = frozenset({"name", "state", "lastId", "delivered", "failures", "attempts", "gaps"})


@dataclass
class Endpoint:
    hook: WebhookSettings
    match: re.Pattern[str] = field(init=False)
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # events, or a retry
    retry_now: asyncio.Event = field(default_factory=asyncio.Event)  # ends a backoff
    task: asyncio.Task[None] | None = None
    row: dict[str, Any] = field(default_factory=dict)  # its webhook_endpoints row, as last seen

    def __post_init__(self) -> None:
        self.match = matcher(self.hook.types)

    def state(self) -> str:
        if not self.row:
            return "new"
        return "dead" if self.row["dead"] else "retrying" if self.row["attempts"] else "live"

    def info(self) -> WebhookInfo:
        row, hook = self.row, self.hook
        return WebhookInfo(
            name=hook.name,
            url=shown_url(hook.url),
            format=hook.format,
            types=list(hook.types),
            state=self.state(),
            last_id=row.get("last_id", 0),
            delivered=row.get("delivered", 0),
            failures=row.get("failures", 0),
            attempts=row.get("attempts", 0),
            max_attempts=hook.max_attempts,
            last_status=row.get("last_status"),
            last_error=row.get("last_error"),
            gaps=row.get("gaps", 0),
            updated_at=row.get("updated_at"),
        )

    def stats(self) -> dict[str, Any]:
        shown: dict[str, Any] = msgspec.to_builtins(self.info())
        return {k: v for k, v in shown.items() if k in _STATS}
