"""Agents' Redis credentials as the database keeps them (the bus applies
them on Redis): the messages and their handlers."""

from __future__ import annotations

from actors.data import repo
from actors.data.repo import Agent
from actors.persistence.base import PgMessage, Store, room

__all__ = ["CreateAgent", "ListAgents", "RevokeAgent", "agents"]

agents = room("agents")


class CreateAgent(PgMessage[tuple[Agent, str]], frozen=True):
    """Give ``name`` Redis credentials (a new agent user, or a revoked one
    again); replies the agent and its password (shown once)."""

    name: str


@agents.handles(CreateAgent)
async def create_agent(db: Store, msg: CreateAgent) -> tuple[Agent, str]:
    async with db.pool().acquire() as conn:
        return await repo.create_agent(conn, msg.name)


class ListAgents(PgMessage[list[Agent]], frozen=True):
    """Every agent, revoked ones too."""


@agents.handles(ListAgents)
async def list_agents(db: Store, _msg: ListAgents) -> list[Agent]:
    async with db.pool().acquire() as conn:
        return await repo.list_agents(conn)


class RevokeAgent(PgMessage[Agent], frozen=True):
    """End an agent's Redis credentials."""

    name: str


@agents.handles(RevokeAgent)
async def revoke_agent(db: Store, msg: RevokeAgent) -> Agent:
    async with db.pool().acquire() as conn:
        return await repo.revoke_agent(conn, msg.name)
