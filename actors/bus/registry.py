"""The bus's inboxes and the agents' Redis users (DESIGN §5, "Trust").

The list of agents lives in PostgreSQL (``agents``); this keeps Redis in
step with it: one inbox stream (and channel) per agent, read by the one
consumer group, and, where the daemon's Redis user may (``bus.manage_acls``),
one ACL user per agent allowed only what ``actors.agents.acl_rules`` says.
ACLs live in Redis' memory: they are applied again after any Redis error (a
restarted server has forgotten them) and every minute.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import msgspec
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from actors.agents import acl_rules, acl_user, agent_inbox, agent_replies, without_credentials
from actors.bus.routes import SHARED, Sender
from actors.kernel import Message
from actors.persistence import ListAgents, PersistenceRef

__all__ = [
    "AclState",
    "ApplyAgents",
    "BusMessage",
    "GetAclState",
    "Inbox",
    "Registry",
    "agents_channel",
]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)  # a message of a reply type is one of any wider type
# Applied again this often even when nothing changed (a Redis restart forgets ACLs).
REAPPLY = 60.0


def agents_channel(prefix: str) -> str:
    return f"{prefix}internal:agents"


@dataclass
class Inbox:
    """One stream the bus reads (and the channel of the same name)."""

    stream: str
    sender: Sender
    replies: str | None = None  # where refusals are told (agents only)
    claim_cursor: str = "0-0"


class AclState(msgspec.Struct, frozen=True, rename="camel"):
    """Whether the daemon manages the agents' Redis users, and if not why;
    the daemon's Redis without its credentials (for the agents' URLs);
    whether the server knows CLIENT SETINFO (the rules allow it where it does)."""

    managed: bool
    error: str
    redis_url: str
    setinfo: bool = True


class BusMessage(Message[R_co], frozen=True):
    """A message the bus actor answers with ``R``."""


class ApplyAgents(BusMessage[AclState], frozen=True):
    """Read the agents again and apply them to Redis now."""


class GetAclState(BusMessage[AclState], frozen=True):
    """The AclState as it is (no Redis, no database)."""


@dataclass
class Registry:
    """The inboxes to read: the shared one (if enabled) and every agent's."""

    prefix: str
    inbox: str  # the shared inbox's name, the base of every agent's
    persistence: PersistenceRef
    shared: bool
    manage: bool
    channels: list[str]
    url: str
    log: Any
    inboxes: dict[str, Inbox] = field(default_factory=dict)
    managed: bool = True
    error: str = ""
    applied: dict[str, list[str]] = field(default_factory=dict)  # ACL user -> rules
    deleted: set[str] = field(default_factory=set)  # revoked ACL users removed
    setinfo: bool = True  # Redis 7.0 has no CLIENT SETINFO to allow
    probed: bool = False
    next_full: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        if self.shared:
            self.inboxes[self.inbox] = Inbox(self.inbox, SHARED)

    def state(self) -> AclState:
        return AclState(self.managed, self.error, without_credentials(self.url), self.setinfo)

    def forget_applied(self) -> None:
        """Redis failed: what it holds is no longer known."""
        self.applied.clear()
        self.deleted.clear()

    async def refresh(self, client: Any) -> tuple[list[str], list[str]] | None:
        """Read the agents, apply their ACL users, and update the inboxes;
        returns the streams added and removed, or None when the database did
        not answer (the inboxes stay as they are; try again soon)."""
        async with self.lock:
            try:
                agents = await self.persistence.ask(ListAgents(), timeout=10)
            except Exception as exc:
                self.log.debug("bus_agents_not_read", error=repr(exc))
                return None
            if not self.probed:
                self.setinfo = _version(await client.info("server")) >= (7, 2)
                self.probed = True
                await self._warn_if_open(client)
            await self._apply(client, agents)
            wanted: dict[str, Inbox] = {}
            if self.shared:
                wanted[self.inbox] = self.inboxes.get(self.inbox) or Inbox(self.inbox, SHARED)
            for agent in agents:
                # A revoked agent's inbox is still read while Redis itself
                # refuses its writes (its user is gone): what it sent before is
                # handled. Where the operator manages the users, the daemon
                # cannot know that: the inbox is no longer read.
                if not agent.active and not self.managed:
                    continue
                stream = agent_inbox(self.inbox, agent.name)
                wanted[stream] = self.inboxes.get(stream) or Inbox(
                    stream,
                    Sender(f"agent:{agent.name}", agent.user_id),
                    agent_replies(self.inbox, agent.name),
                )
            added = [s for s in wanted if s not in self.inboxes]
            removed = [s for s in self.inboxes if s not in wanted]
            self.inboxes = wanted
            return added, removed

    async def _warn_if_open(self, client: Any) -> None:
        """An open default user (no password) lets anyone who reaches the
        Redis act as the daemon: agents' own users then protect nothing."""
        try:
            found: Any = await self._acl(client, "GETUSER", "default")
        except ResponseError:
            return  # not ours to read: the operator set the server up
        if isinstance(found, dict) and "flags" not in found and b"flags" not in found:
            found = next(iter(found.values()), None)  # a cluster: one node's answer
        if isinstance(found, list):  # unparsed: field, value, field, value, …
            found = dict(zip(found[::2], found[1::2], strict=False))
        found = {_text(k): v for k, v in (found or {}).items()}
        flags = {_text(f) for f in found.get("flags") or []}
        if {"on", "nopass"} <= flags:
            self.log.warning(
                "redis_default_user_open",
                hint="anyone who can reach this Redis acts as the daemon; give the daemon a "
                "user of its own and turn the default user off (docs/trust.md)",
            )

    # -- ACL users ------------------------------------------------------------------------
    async def _apply(self, client: Any, agents: list[Any]) -> None:
        if not self.manage:
            self.managed, self.error = False, "bus.manage_acls is false"
            return
        now = time.monotonic()
        if now >= self.next_full:
            self.forget_applied()
            self.next_full = now + REAPPLY
        if not self.applied and isinstance(client, RedisCluster):
            # Applying to every node: ask the cluster which nodes there are now
            # (replicas that joined, a replica promoted).
            await client.nodes_manager.initialize()
        changed = False
        try:
            for agent in agents:
                user = acl_user(self.prefix, agent.name)
                if not agent.active:  # revoked, disabled, no longer an agent
                    if user not in self.deleted:
                        # Its connections go with it (Redis disconnects them).
                        await self._acl(client, "DELUSER", user)
                        self.applied.pop(user, None)
                        self.deleted.add(user)
                        changed = True
                    continue
                self.deleted.discard(user)
                rules = self._rules(agent)
                if self.applied.get(user) != rules:
                    await self._setuser(client, user, agent)
                    changed = True
            changed |= await self._remove_unknown(client, agents)
            if changed:
                await self._save(client)
        except ResponseError as exc:
            # Any refusal (NOPERM, no ACL command, a server before selectors):
            # the agents' users are the operator's to apply; the bus goes on.
            text = str(exc)
            if self.managed:
                self.log.error("bus_acls_not_managed", error=text)
            self.managed, self.error = False, f"Redis refused ACL changes: {text}"
            return
        self.managed, self.error = True, ""

    async def _remove_unknown(self, client: Any, agents: list[Any]) -> bool:
        """Agents' Redis users of this prefix that no agent has any more (its
        user was deleted): removed, with their connections."""
        known = {acl_user(self.prefix, a.name) for a in agents}
        found: Any = await self._acl(client, "USERS")
        names = found if isinstance(found, list) else [n for v in found.values() for n in v]
        mine = {_text(n) for n in names} - known
        stale = sorted(n for n in mine if n.startswith(acl_user(self.prefix, "")))
        if stale:
            await self._acl(client, "DELUSER", *stale)
            self.log.info("bus_agents_removed", users=stale)
        return bool(stale)

    def _rules(self, agent: Any) -> list[str]:
        return acl_rules(
            prefix=self.prefix,
            inbox=self.inbox,
            name=agent.name,
            secret_hash=agent.secret_hash,
            channels=self.channels,
            setinfo=self.setinfo,
            select=database_of(self.url) != 0,
        )

    async def _setuser(self, client: Any, user: str, agent: Any) -> None:
        try:
            await self._acl(client, "SETUSER", user, *self._rules(agent))
        except ResponseError as exc:
            if not self.setinfo or "setinfo" not in str(exc).lower():
                raise
            self.setinfo = False  # a server before CLIENT SETINFO: allow what it has
            await self._acl(client, "SETUSER", user, *self._rules(agent))
        self.applied[user] = self._rules(agent)

    async def _acl(self, client: Any, *args: str) -> Any:
        if isinstance(client, RedisCluster):  # ACLs are per node, replicas too
            # (Named one by one: redis-py cannot route "ACL …" to a node flag.)
            return await client.execute_command("ACL", *args, target_nodes=client.get_nodes())
        return await client.execute_command("ACL", *args)

    async def _save(self, client: Any) -> None:
        """Write the ACL file, where the server has one (the embedded Valkey)."""
        try:
            await self._acl(client, "SAVE")
        except ResponseError as exc:
            if "ACL file" not in str(exc) and "aclfile" not in str(exc).lower():
                self.log.warning("bus_acl_save_failed", error=str(exc))


def database_of(url: str) -> int:
    """The database number a Redis URL names (0 when none)."""
    parts = urlsplit(url)
    found = parse_qs(parts.query).get("db", [""])[0] or parts.path.strip("/")
    return int(found) if found.isdigit() else 0


def _version(info: Any) -> tuple[int, ...]:
    """The server's version from INFO (7.2 brought CLIENT SETINFO; a cluster
    client may answer per node)."""
    if "redis_version" not in info and info:
        info = next(iter(info.values()))
    try:
        return tuple(int(p) for p in str(info.get("redis_version", "0")).split(".")[:2])
    except ValueError:
        return (0,)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
