"""Agents on Redis: the users (role ``agent``) that hold Redis credentials of
their own (DESIGN §5, "Trust"). The password is made here and shown once;
the database keeps its SHA-256, which is what Redis' ACL is given."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

import asyncpg
import msgspec

from actors.data.model import _Wire
from actors.data.repo.common import Conflict, NotFound

__all__ = ["Agent", "create_agent", "list_agents", "revoke_agent"]


class Agent(_Wire, frozen=True):
    """An agent as the daemon keeps it (its secret is only the hash)."""

    name: str
    user_id: int
    created_at: datetime
    revoked_at: datetime | None
    secret_hash: str = msgspec.field(default="")
    # Its Redis user may be used: not revoked, and its user enabled and still an agent.
    active: bool = True


_COLUMNS = (
    "u.username AS name, a.user_id, a.created_at, a.revoked_at, a.secret_hash, "
    "(a.revoked_at IS NULL AND NOT u.disabled AND u.role = 'agent') AS active"
)


async def create_agent(conn: asyncpg.Connection, name: str) -> tuple[Agent, str]:
    """Give ``name`` Redis credentials: a new user of role agent, or an
    existing agent user whose credentials were revoked. Returns the agent and
    its password (shown once)."""
    password = secrets.token_urlsafe(32)
    digest = hashlib.sha256(password.encode()).hexdigest()
    async with conn.transaction():
        user = await conn.fetchrow(
            "SELECT id, role FROM users WHERE lower(username) = lower($1) FOR UPDATE", name
        )
        if user is None:
            user = await conn.fetchrow(
                "INSERT INTO users (username, role) VALUES ($1, 'agent') RETURNING id, role", name
            )
        elif user["role"] != "agent":
            raise Conflict(f"{name!r} is a user of role {user['role']}, not an agent")
        row = await conn.fetchrow(
            "INSERT INTO agents (user_id, secret_hash) VALUES ($1, $2) "
            "ON CONFLICT (user_id) DO UPDATE SET secret_hash = excluded.secret_hash, "
            "created_at = now(), revoked_at = NULL WHERE agents.revoked_at IS NOT NULL "
            "RETURNING user_id",
            user["id"],
            digest,
        )
        if row is None:
            raise Conflict(f"agent {name!r} has Redis credentials already; revoke them first")
        found = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM agents a JOIN users u ON u.id = a.user_id "
            f"WHERE a.user_id = $1",
            user["id"],
        )
    return Agent(**dict(found)), password


async def list_agents(conn: asyncpg.Connection) -> list[Agent]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM agents a JOIN users u ON u.id = a.user_id ORDER BY u.username"
    )
    return [Agent(**dict(r)) for r in rows]


async def revoke_agent(conn: asyncpg.Connection, name: str) -> Agent:
    row = await conn.fetchrow(
        f"UPDATE agents a SET revoked_at = coalesce(a.revoked_at, now()) FROM users u "
        f"WHERE u.id = a.user_id AND lower(u.username) = lower($1) RETURNING {_COLUMNS}",
        name,
    )
    if row is None:
        raise NotFound(f"no agent {name!r}")
    return Agent(**dict(row))
