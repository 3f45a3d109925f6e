"""The event outbox (DESIGN §5): events written in the transaction of the
change they announce (``store``), relayed to Redis in id order by one
daemon at a time (``relay``), and sent to webhook endpoints (``webhooks``)."""

from actors.outbox.relay import Relay, RelayRef, Wake
from actors.outbox.store import NOTIFY_CHANNEL, OUTBOX_LOCK, body_of, record, wire
from actors.outbox.webhook_messages import ListWebhooks, RetryWebhook, WebhookInfo, WebhooksRef
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
