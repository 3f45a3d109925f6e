"""Users and API tokens (DESIGN §4)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from actors.data import credentials
from actors.data.listing import Filter, ListQuery, ListSpec
from actors.data.model import (
    Page,
    Principal,
    Token,
    TokenCreate,
    TokenCreated,
    User,
    UserCreate,
    UserUpdate,
)
from actors.data.repo.common import Conflict, JsonPage, NotFound, json_page, page

USER_COLUMNS = (
    "id, username, email, role, preferences, disabled, created_at, updated_at, last_login_at"
)
TOKEN_COLUMNS = "id, user_id, name, prefix, created_at, last_used_at, expires_at, revoked_at"  # noqa: S105


def _user(row: asyncpg.Record) -> User:
    return User(**dict(row))


def _token(row: asyncpg.Record) -> Token:
    return Token(**dict(row))


async def create_user(conn: asyncpg.Connection, new: UserCreate, password_hash: str | None) -> User:
    try:
        row = await conn.fetchrow(
            f"INSERT INTO users (username, email, password_hash, role, preferences) VALUES ($1, $2, $3, $4, $5) "
            f"RETURNING {USER_COLUMNS}",
            new.username,
            new.email,
            password_hash,
            new.role,
            new.preferences,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"username {new.username!r} is taken") from None
    return _user(row)


async def get_user(conn: asyncpg.Connection, user_id: int) -> User:
    row = await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id)
    if row is None:
        raise NotFound(f"no user {user_id}")
    return _user(row)


async def get_user_by_name(conn: asyncpg.Connection, username: str) -> User:
    row = await conn.fetchrow(
        f"SELECT {USER_COLUMNS} FROM users WHERE lower(username) = lower($1)", username
    )
    if row is None:
        raise NotFound(f"no user {username!r}")
    return _user(row)


async def update_user(
    conn: asyncpg.Connection, user_id: int, change: UserUpdate, password_hash: str | None
) -> User:
    sets: list[str] = []
    args: list[Any] = [user_id]
    for field in ("email", "role", "preferences", "disabled"):
        value = getattr(change, field)
        if value is not msgspec.UNSET:
            args.append(value)
            sets.append(f"{field} = ${len(args)}")
    if password_hash is not None:
        args.append(password_hash)
        sets.append(f"password_hash = ${len(args)}")
    if password_hash is not None or change.disabled is not msgspec.UNSET:
        # Every login session made under the old credentials ends with them.
        sets.append("credentials_version = credentials_version + 1")
    if not sets:
        return await get_user(conn, user_id)
    async with conn.transaction():
        row = await conn.fetchrow(
            f"UPDATE users SET {', '.join(sets)}, updated_at = now() WHERE id = $1 RETURNING {USER_COLUMNS}",
            *args,
        )
        if row is None:
            raise NotFound(f"no user {user_id}")
        if change.disabled is True or (change.role not in (msgspec.UNSET, "agent")):
            # An agent disabled or given another role loses its Redis
            # credentials for good: enabling it again revives none.
            await conn.execute(
                "UPDATE agents SET revoked_at = coalesce(revoked_at, now()) WHERE user_id = $1",
                user_id,
            )
        if change.role is not msgspec.UNSET or change.disabled is not msgspec.UNSET:
            await _keep_an_admin(conn)
    return _user(row)


async def _keep_an_admin(conn: asyncpg.Connection) -> None:
    admins = await conn.fetchval("SELECT count(*) FROM users WHERE role = 'admin' AND NOT disabled")
    if admins == 0:
        raise Conflict("that would leave no enabled admin")


async def delete_user(conn: asyncpg.Connection, user_id: int) -> None:
    async with conn.transaction():
        done = await conn.fetchval("DELETE FROM users WHERE id = $1 RETURNING id", user_id)
        if done is None:
            raise NotFound(f"no user {user_id}")
        await _keep_an_admin(conn)


async def password_hash_of(
    conn: asyncpg.Connection, username: str
) -> tuple[User, str | None, int] | None:
    """The user, their password hash and their credentials version."""
    row = await conn.fetchrow(
        f"SELECT {USER_COLUMNS}, password_hash, credentials_version FROM users "
        f"WHERE lower(username) = lower($1)",
        username,
    )
    if row is None:
        return None
    data = dict(row)
    stored = data.pop("password_hash")
    version = data.pop("credentials_version")
    return User(**data), stored, int(version)


async def record_login(conn: asyncpg.Connection, user_id: int) -> None:
    await conn.execute("UPDATE users SET last_login_at = now() WHERE id = $1", user_id)


async def has_admin(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE role = 'admin')"))


# -- tokens ------------------------------------------------------------------------------------
async def create_token(
    conn: asyncpg.Connection, user_id: int, new: TokenCreate, *, max_live: int = 100
) -> TokenCreated:
    """A new token, unless the user already holds ``max_live`` live ones (409)."""
    token = credentials.new_token()
    expires = (
        None
        if new.expires_in is None
        else datetime.now().astimezone() + timedelta(seconds=new.expires_in)
    )
    async with conn.transaction():
        # The user's row lock serializes token creation per user: the bound holds.
        if await conn.fetchval("SELECT id FROM users WHERE id = $1 FOR UPDATE", user_id) is None:
            raise NotFound(f"no user {user_id}")
        live = await conn.fetchval(
            "SELECT count(*) FROM api_tokens WHERE user_id = $1 AND revoked_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > now())",
            user_id,
        )
        if live >= max_live:
            raise Conflict(
                f"user {user_id} holds {live} live tokens (auth.max_tokens_per_user); "
                "revoke some first"
            )
        row = await conn.fetchrow(
            f"INSERT INTO api_tokens (user_id, name, token_hash, prefix, expires_at) "
            f"VALUES ($1, $2, $3, $4, $5) RETURNING {TOKEN_COLUMNS}",
            user_id,
            new.name,
            credentials.hash_token(token),
            credentials.token_display_prefix(token),
            expires,
        )
    return TokenCreated(token=token, info=_token(row))


LISTED_TOKENS = 200


async def list_tokens(conn: asyncpg.Connection, user_id: int) -> list[Token]:
    """The user's tokens, newest first: at most LISTED_TOKENS (revoked and
    expired ones included, so that the list shows what happened to them)."""
    rows = await conn.fetch(
        f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE user_id = $1 ORDER BY id DESC LIMIT $2",
        user_id,
        LISTED_TOKENS,
    )
    return [_token(r) for r in rows]


async def revoke_token(conn: asyncpg.Connection, user_id: int | None, token_id: int) -> Token:
    row = await conn.fetchrow(
        f"UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) "
        f"WHERE id = $1 AND ($2::bigint IS NULL OR user_id = $2) RETURNING {TOKEN_COLUMNS}",
        token_id,
        user_id,
    )
    if row is None:
        raise NotFound(f"no token {token_id}")
    return _token(row)


async def authenticate_token(conn: asyncpg.Connection, token: str) -> Principal | None:
    """The token's user, if the token is live and the user enabled. Touches
    last_used_at at most once a minute, so reads stay reads."""
    row = await conn.fetchrow(
        "SELECT t.id AS token_id, u.id, u.username, u.role, "
        "extract(epoch FROM t.expires_at)::float8 AS expires_epoch, "
        "t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute' AS stale "
        "FROM api_tokens t JOIN users u ON u.id = t.user_id "
        "WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now()) "
        "AND NOT u.disabled",
        credentials.hash_token(token),
    )
    if row is None:
        return None
    if row["stale"]:  # one write a minute per token, not one per request
        await conn.execute(
            "UPDATE api_tokens SET last_used_at = now() WHERE id = $1", row["token_id"]
        )
    return Principal(
        user_id=row["id"],
        role=row["role"],
        name=row["username"],
        via="token",
        token_id=row["token_id"],
        expires_at=row["expires_epoch"],
    )


async def principal_of(
    conn: asyncpg.Connection, user_id: int, via: str, credentials_version: int | None = None
) -> Principal | None:
    """The user as a caller, if the user exists and is enabled (session
    authentication), and, when given, still has ``credentials_version``."""
    row = await conn.fetchrow(
        "SELECT id, username, role FROM users WHERE id = $1 AND NOT disabled "
        "AND ($2::bigint IS NULL OR credentials_version = $2)",
        user_id,
        credentials_version,
    )
    if row is None:
        return None
    return Principal(user_id=row["id"], role=row["role"], name=row["username"], via=via)  # type: ignore[arg-type]


USERS = ListSpec(
    table="users",
    columns=USER_COLUMNS,
    filters={
        "role": Filter("role", "in", choices=frozenset({"admin", "approver", "user", "agent"})),
        "disabled": Filter("disabled", "bool", bool),
        "q": Filter("username || ' ' || coalesce(email, '')", "like"),
    },
    orders={
        "createdAt": ("created_at", datetime),
        "username": ("username", str),
        "id": ("id", int),
    },
    default_order="id",
)


async def list_users(
    conn: asyncpg.Connection, lq: ListQuery, count: str | None, *, as_json: bool = False
) -> Page[User] | JsonPage:
    if as_json:
        return await json_page(conn, USERS, lq, User, count)
    return await page(conn, USERS, lq, _user, count)
