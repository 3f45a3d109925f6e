"""The event outbox (DESIGN §5): events written in the transaction of the
change they announce (``store``), relayed to Redis in id order by one
daemon at a time (``relay``), and sent to webhook endpoints (``webhooks``).

The actors are loaded on first use: what writes events (the persistence
actor, the command line's data commands) needs only ``store`` and the
messages, not Redis or the webhook client."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from actors.outbox.relay_messages import RelayRef, Wake
from actors.outbox.store import NOTIFY_CHANNEL, OUTBOX_LOCK, body_of, record, wire
from actors.outbox.webhook_messages import ListWebhooks, RetryWebhook, WebhookInfo, WebhooksRef

if TYPE_CHECKING:
    from actors.outbox.relay import Relay
    from actors.outbox.webhooks import Webhooks

__all__ = [
    "NOTIFY_CHANNEL",
    "OUTBOX_LOCK",
    "ListWebhooks",
    "Relay",
    "RelayRef",
    "RetryWebhook",
    "Wake",
    "WebhookInfo",
    "Webhooks",
    "WebhooksRef",
    "body_of",
    "record",
    "wire",
]

_ACTORS = {"Relay": "actors.outbox.relay", "Webhooks": "actors.outbox.webhooks"}


def __getattr__(name: str) -> type[Relay] | type[Webhooks]:
    if name in _ACTORS:
        actor: type[Relay] | type[Webhooks] = getattr(importlib.import_module(_ACTORS[name]), name)
        return actor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
