"""``/agents`` (admins): agents on Redis, each with credentials of its own
(DESIGN §5, "Trust").

``POST /agents`` gives an agent (a user of role agent, made if needed) a
Redis user that may only append to its own inbox and use the channels an
agent may; the answer holds its Redis URL with the password, shown once.
``DELETE /agents/{name}`` revokes it: Redis forgets the user and closes its
connections. Where the daemon may not manage Redis' ACL (``bus.manage_acls``,
or a Redis that refuses), the answer says so and holds the lines an
operator applies on every Redis node.
"""

from __future__ import annotations

import re
from datetime import datetime

import msgspec
import structlog
from aiohttp import web

from actors import persistence as m
from actors.agents import acl_lines, acl_rules, acl_user, agent_inbox, agent_replies, agent_url
from actors.bus import AclState, ApplyAgents, GetAclState, agents_channel, database_of
from actors.data.model import Principal, Username
from actors.data.repo import Agent, NotFound
from actors.pubsub import Publish
from jarvisd.http.auth import require
from jarvisd.http.common import RouteDoc, actors_of, body, reply
from jarvisd.http.errors import ProblemError, reject_unknown_params
from jarvisd.http.keys import RUNTIME

__all__ = ["ROUTES", "apply_agents"]

log = structlog.get_logger("jarvisd", actor="http")


class AgentCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Username


class AgentInfo(msgspec.Struct, frozen=True, rename="camel"):
    name: str
    user_id: int
    created_at: datetime
    revoked_at: datetime | None
    sender: str  # what its commands record as their sender
    redis_user: str
    inbox: str  # XADD <inbox> * envelope <json>, or PUBLISH <inbox> <json>
    replies: str  # SUBSCRIBE: why an envelope was refused


class AgentRevoked(msgspec.Struct, frozen=True, rename="camel"):
    agent: AgentInfo
    acls_managed: bool
    # Where the daemon does not manage Redis' ACL: apply on every node (its
    # inbox is no longer read meanwhile).
    acl: list[str]


class AgentCreated(msgspec.Struct, frozen=True, rename="camel"):
    agent: AgentInfo
    redis_url: str  # with the agent's password: shown once
    acls_managed: bool
    # Where the daemon does not manage Redis' ACL: apply these on every node
    # (redis-cli, or an ACL file), then the URL works.
    acl: list[str]
    acl_error: str = ""


def _info(request: web.Request, agent: Agent) -> AgentInfo:
    s = request.app[RUNTIME].settings
    return AgentInfo(
        name=agent.name,
        user_id=agent.user_id,
        created_at=agent.created_at,
        revoked_at=agent.revoked_at,
        sender=f"agent:{agent.name}",
        redis_user=acl_user(s.redis.prefix, agent.name),
        inbox=agent_inbox(s.inbox, agent.name),
        replies=agent_replies(s.inbox, agent.name),
    )


@require("admin")
async def create_agent(request: web.Request, _who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    new = await body(request, AgentCreate)
    agent, password = await actors_of(request).persistence.ask(m.CreateAgent(name=new.name))
    try:
        state = await apply_agents(request)
    except Exception as exc:
        # The agent exists and its password is shown only here: answer with
        # it, and say the Redis user is not there yet (the bus applies it at
        # its next round).
        log.warning("agent_not_applied", agent=agent.name, error=repr(exc))
        known: AclState = await actors_of(request).bus.ask(GetAclState())
        state = msgspec.structs.replace(known, managed=False, error=f"not applied yet: {exc}")
    s = request.app[RUNTIME].settings
    user = acl_user(s.redis.prefix, agent.name)
    lines: list[str] = []
    if not state.managed:
        rules = acl_rules(
            prefix=s.redis.prefix,
            inbox=s.inbox,
            name=agent.name,
            secret_hash=agent.secret_hash,
            channels=list(s.pubsub.channels),
            setinfo=state.setinfo,
            select=database_of(state.redis_url) != 0,
        )
        lines = acl_lines(user, rules)
    created = AgentCreated(
        agent=_info(request, agent),
        redis_url=agent_url(state.redis_url, user, password),
        acls_managed=state.managed,
        acl=lines,
        acl_error=state.error,
    )
    return reply(created, 201, {"Location": f"/agents/{agent.name}"})


@require("admin")
async def list_agents(request: web.Request, _who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    agents: list[Agent] = await actors_of(request).persistence.ask(m.ListAgents())
    return reply([_info(request, a) for a in agents])


@require("admin")
async def revoke_agent(request: web.Request, _who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    name = request.match_info["name"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", name):
        raise ProblemError(404, "Not found", "no such agent")
    try:
        agent = await actors_of(request).persistence.ask(m.RevokeAgent(name=name))
    except NotFound:
        raise ProblemError(404, "Not found", f"no agent {name[:64]!r}") from None
    state = await apply_agents(request)
    user = acl_user(request.app[RUNTIME].settings.redis.prefix, agent.name)
    lines = [] if state.managed else [f"ACL DELUSER '{user}'"]
    return reply(AgentRevoked(agent=_info(request, agent), acls_managed=state.managed, acl=lines))


async def apply_agents(request: web.Request) -> AclState:
    """Apply the agents to Redis now, here; and tell the other daemons."""
    state: AclState = await actors_of(request).bus.ask(ApplyAgents())
    prefix = request.app[RUNTIME].settings.redis.prefix
    try:
        await actors_of(request).pubsub.ask(Publish(agents_channel(prefix), b"changed"))
    except Exception as exc:  # the others read the agents again within bus.agents_interval
        log.warning("agents_change_not_published", error=repr(exc))
    return state


ROUTES: list[RouteDoc] = [
    RouteDoc(
        "POST",
        "/agents",
        create_agent,
        "Give an agent Redis credentials of its own (its URL is shown once)",
        AgentCreate,
        AgentCreated,
        201,
    ),
    RouteDoc("GET", "/agents", list_agents, "List agents on Redis", response=list[AgentInfo]),
    RouteDoc(
        "DELETE",
        "/agents/{name}",
        revoke_agent,
        "Revoke an agent's Redis credentials (its connections close)",
        response=AgentRevoked,
    ),
]
