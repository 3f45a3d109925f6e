"""The bus actor (``actor``): the agents' inboxes read durably from Redis
streams (``reader``), routed to the actors that apply them (``routes``),
settled (``store``); the fire-and-forget path (``published``); the agents'
inboxes and Redis users (``registry``)."""

from actors.bus.actor import Bus, BusRef
from actors.bus.registry import (
    AclState,
    ApplyAgents,
    BusMessage,
    GetAclState,
    agents_channel,
    database_of,
)
from actors.bus.store import BusStats

__all__ = [
    "AclState",
    "ApplyAgents",
    "Bus",
    "BusMessage",
    "BusRef",
    "BusStats",
    "GetAclState",
    "agents_channel",
    "database_of",
]
