"""The event outbox (DESIGN §5): events written in the transaction of the
change they announce (``store``), and relayed to Redis in id order by one
daemon at a time (``relay``)."""

from actors.outbox.relay import Relay, RelayRef, Wake
from actors.outbox.store import NOTIFY_CHANNEL, OUTBOX_LOCK, body_of, record, wire

__all__ = [
    "NOTIFY_CHANNEL",
    "OUTBOX_LOCK",
    "Relay",
    "RelayRef",
    "Wake",
    "body_of",
    "record",
    "wire",
]
