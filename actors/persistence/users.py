"""Users, their passwords, the login session key and the first admin: the
messages and the handlers that answer them."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
from typing import Any

import msgspec

from actors.data import credentials, repo
from actors.data.model import (
    Page,
    Principal,
    TokenCreate,
    TokenCreated,
    User,
    UserCreate,
    UserUpdate,
)
from actors.data.repo import Forbidden
from actors.data.repo.common import JsonPage
from actors.persistence.base import Count, PgMessage, Store, room

__all__ = [
    "CheckPassword",
    "CreateUser",
    "CredentialStamp",
    "DeleteUser",
    "EnsureAdmin",
    "GetUser",
    "GetUserByName",
    "ListUsers",
    "RotateSessionKey",
    "SessionKey",
    "UpdateUser",
    "users",
]

users = room("users")

_BOOTSTRAP_LOCK = (
    int.from_bytes(hashlib.sha256(b"jarvisd.bootstrap-admin").digest()[:8], "big") >> 1
)
SESSION_KEY = "login_session_key"  # its row in jarvisd_info


@functools.cache
def _dummy_hash() -> str:
    """Verified when the user is unknown or has no password, so that a login
    costs the same whether or not the user exists or has a password."""
    return credentials.hash_password(secrets.token_urlsafe(16))


class CreateUser(PgMessage[User], frozen=True):
    new: UserCreate


@users.handles(CreateUser)
async def create_user(db: Store, msg: CreateUser) -> User:
    hashed = (
        None
        if msg.new.password is None
        else await asyncio.to_thread(credentials.hash_password, msg.new.password)
    )
    async with db.pool().acquire() as conn:
        return await repo.create_user(conn, msg.new, hashed)


class GetUser(PgMessage[User], frozen=True):
    """The user (repo.NotFound for an unknown id)."""

    user_id: int


@users.handles(GetUser)
async def get_user(db: Store, msg: GetUser) -> User:
    async with db.pool().acquire() as conn:
        return await repo.get_user(conn, msg.user_id)


class GetUserByName(PgMessage[User], frozen=True):
    username: str


@users.handles(GetUserByName)
async def get_user_by_name(db: Store, msg: GetUserByName) -> User:
    async with db.pool().acquire() as conn:
        return await repo.get_user_by_name(conn, msg.username)


class ListUsers(PgMessage[Page[User] | JsonPage], frozen=True):
    query: Any  # ListQuery, parsed at the edge
    count: Count = None
    as_json: bool = False  # items as JSON written by PostgreSQL (repo.JsonPage)


@users.handles(ListUsers)
async def list_users(db: Store, msg: ListUsers) -> Page[User] | JsonPage:
    async with db.pool().acquire() as conn:
        return await repo.list_users(conn, msg.query, msg.count, as_json=msg.as_json)


class UpdateUser(PgMessage[User], frozen=True):
    user_id: int
    change: UserUpdate
    # A new password is accepted only with the right change.current_password
    # (when the user has a password): the API sets this unless an admin resets
    # someone else's.
    verify_current: bool = False


@users.handles(UpdateUser)
async def update_user(db: Store, msg: UpdateUser) -> User:
    hashed = None
    if msg.change.password is not msgspec.UNSET:
        if msg.verify_current:
            await _verify_current_password(db, msg)
        hashed = await asyncio.to_thread(credentials.hash_password, msg.change.password)
    async with db.pool().acquire() as conn:
        return await repo.update_user(conn, msg.user_id, msg.change, hashed)


async def _verify_current_password(db: Store, msg: UpdateUser) -> None:
    async with db.pool().acquire() as conn:
        user = await repo.get_user(conn, msg.user_id)
        found = await repo.password_hash_of(conn, user.username)
    stored = found[1] if found is not None else None
    if stored is None:
        return  # no password yet: nothing to prove
    given = msg.change.current_password
    if given is msgspec.UNSET:
        raise Forbidden("changing a password needs the current one (currentPassword)")
    ok = await asyncio.to_thread(credentials.verify_password, given, stored)
    if not ok:
        raise Forbidden("the current password is wrong")


class DeleteUser(PgMessage[None], frozen=True):
    user_id: int


@users.handles(DeleteUser)
async def delete_user(db: Store, msg: DeleteUser) -> None:
    async with db.pool().acquire() as conn:
        await repo.delete_user(conn, msg.user_id)


class CheckPassword(PgMessage[tuple[Principal, int] | None], frozen=True):
    """(Principal, credentials version) when the password is right and the
    user enabled, else None. The version is raised whenever the user's
    password or disabled state changes (see CredentialStamp)."""

    username: str
    password: str


@users.handles(CheckPassword)
async def check_password(db: Store, msg: CheckPassword) -> tuple[Principal, int] | None:
    async with db.pool().acquire() as conn:
        found = await repo.password_hash_of(conn, msg.username)
    # One scrypt run whatever the case, so timing does not tell which
    # names exist or which users have a password.
    stored = found[1] if found is not None else None
    ok = await asyncio.to_thread(credentials.verify_password, msg.password, stored or _dummy_hash())
    if not ok or stored is None or found is None or found[0].disabled:
        return None
    user = found[0]
    async with db.pool().acquire() as conn:
        await repo.record_login(conn, user.id)
    principal = Principal(user_id=user.id, role=user.role, name=user.username, via="session")
    return principal, found[2]


class CredentialStamp(PgMessage[int | None], frozen=True):
    """The user's credentials version now, or None for an unknown user: a
    login compares it with CheckPassword's to notice a change made meanwhile."""

    user_id: int


@users.handles(CredentialStamp)
async def credential_stamp(db: Store, msg: CredentialStamp) -> int | None:
    async with db.pool().acquire() as conn:
        found = await conn.fetchval(
            "SELECT credentials_version FROM users WHERE id = $1", msg.user_id
        )
    return None if found is None else int(found)


class SessionKey(PgMessage[bytes], frozen=True):
    """The key login session records are signed with."""


@users.handles(SessionKey)
async def session_key(db: Store, _msg: SessionKey) -> bytes:
    async with db.pool().acquire() as conn:
        found = await conn.fetchval("SELECT value FROM jarvisd_info WHERE key = $1", SESSION_KEY)
    if found is None:
        raise RuntimeError("the login session key is missing: run jarvisd migrate")
    return bytes.fromhex(found)


class RotateSessionKey(PgMessage[None], frozen=True):
    """Replace the login session key: every login session ends."""


@users.handles(RotateSessionKey)
async def rotate_session_key(db: Store, _msg: RotateSessionKey) -> None:
    async with db.pool().acquire() as conn:
        await conn.execute(
            "UPDATE jarvisd_info SET value = $2, created_at = now() WHERE key = $1",
            SESSION_KEY,
            secrets.token_hex(32),
        )


class EnsureAdmin(PgMessage[TokenCreated | None], frozen=True):
    """First start: create user ``username`` as admin with a token if no
    admin exists. Replies the token, or None when an admin exists already."""

    username: str = "admin"


@users.handles(EnsureAdmin)
async def ensure_admin(db: Store, msg: EnsureAdmin) -> TokenCreated | None:
    async with db.pool().acquire() as conn, conn.transaction():
        # Several daemons may start at once on one database: one creates the admin.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _BOOTSTRAP_LOCK)
        if await repo.has_admin(conn):
            return None
        user = await repo.create_user(conn, UserCreate(username=msg.username, role="admin"), None)
        return await repo.create_token(conn, user.id, TokenCreate(name="bootstrap"))
