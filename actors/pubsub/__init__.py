"""Redis pub/sub for the process: the actor and its connection (``actor``,
``listener``), local receivers (``subscriber``), the messages and the
reference that sends them (``messages``), and the one subscribe-and-retry
loop everyone uses (``subscription``)."""

from actors.pubsub.actor import CLIENTS_PUBSUB, PubSub, changes_channel
from actors.pubsub.messages import (
    Detach,
    Publish,
    PubSubMessage,
    PubSubRef,
    RelayEvents,
    Subscribe,
    Unsubscribe,
)
from actors.pubsub.subscriber import Delivery, Overflow, Sink, Subscriber
from actors.pubsub.subscription import Subscription

__all__ = [
    "CLIENTS_PUBSUB",
    "Delivery",
    "Detach",
    "Overflow",
    "PubSub",
    "PubSubMessage",
    "PubSubRef",
    "Publish",
    "RelayEvents",
    "Sink",
    "Subscribe",
    "Subscriber",
    "Subscription",
    "Unsubscribe",
    "changes_channel",
]
