"""Read by tests/test_typing.py with mypy: every line marked ``# wrong`` must
be a type error. Never imported by the suite."""

from __future__ import annotations

from actors.cache import CacheGet, CacheRef
from actors.data.model import User
from actors.persistence import GetUser, ListAgents, PersistenceRef


async def uses(persistence: PersistenceRef, cache: CacheRef) -> None:
    user: User = await persistence.ask(GetUser(user_id=1))  # right: a User
    hit, _value = await cache.ask(CacheGet("ns", "k"))  # right: (bool, value)
    name: int = (await persistence.ask(GetUser(user_id=1))).username  # wrong
    agents: str = await persistence.ask(ListAgents())  # wrong
    await persistence.ask(CacheGet("ns", "k"))  # wrong
    await cache.ask(GetUser(user_id=1))  # wrong
    del user, hit, name, agents
