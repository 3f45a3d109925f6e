"""Handlers of the user and token messages; mixed into the persistence actor."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
from typing import Any

import msgspec

from actors.data import credentials, repo
from actors.data import messages as m
from actors.data.model import Principal, TokenCreate, UserCreate
from actors.data.repo import Forbidden
from actors.kernel import handles

_BOOTSTRAP_LOCK = (
    int.from_bytes(hashlib.sha256(b"jarvisd.bootstrap-admin").digest()[:8], "big") >> 1
)


@functools.cache
def _dummy_hash() -> str:
    """Verified when the user is unknown or has no password, so that a login
    costs the same whether or not the user exists or has a password."""
    return credentials.hash_password(secrets.token_urlsafe(16))


SESSION_KEY = "login_session_key"  # its row in jarvisd_info


class DataHandlers:
    """Users, tokens and the first admin. Requires ``self._pool()`` from the actor."""

    def _pool(self) -> Any:  # persistence.GuardedPool
        raise NotImplementedError

    # -- users ---------------------------------------------------------------------------
    @handles(m.CreateUser)
    async def _create_user(self, msg: m.CreateUser) -> Any:
        hashed = (
            None
            if msg.new.password is None
            else await asyncio.to_thread(credentials.hash_password, msg.new.password)
        )
        async with self._pool().acquire() as conn:
            return await repo.create_user(conn, msg.new, hashed)

    @handles(m.GetUser)
    async def _get_user(self, msg: m.GetUser) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.get_user(conn, msg.user_id)

    @handles(m.GetUserByName)
    async def _get_user_by_name(self, msg: m.GetUserByName) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.get_user_by_name(conn, msg.username)

    @handles(m.ListUsers)
    async def _list_users(self, msg: m.ListUsers) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.list_users(conn, msg.query, msg.count, as_json=msg.as_json)

    @handles(m.UpdateUser)
    async def _update_user(self, msg: m.UpdateUser) -> Any:
        hashed = None
        if msg.change.password is not msgspec.UNSET:
            if msg.verify_current:
                await self._verify_current_password(msg)
            hashed = await asyncio.to_thread(credentials.hash_password, msg.change.password)
        async with self._pool().acquire() as conn:
            return await repo.update_user(conn, msg.user_id, msg.change, hashed)

    async def _verify_current_password(self, msg: m.UpdateUser) -> None:
        async with self._pool().acquire() as conn:
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

    @handles(m.DeleteUser)
    async def _delete_user(self, msg: m.DeleteUser) -> None:
        async with self._pool().acquire() as conn:
            await repo.delete_user(conn, msg.user_id)

    @handles(m.CheckPassword)
    async def _check_password(self, msg: m.CheckPassword) -> tuple[Principal, int] | None:
        async with self._pool().acquire() as conn:
            found = await repo.password_hash_of(conn, msg.username)
        # One scrypt run whatever the case, so timing does not tell which
        # names exist or which users have a password.
        stored = found[1] if found is not None else None
        ok = await asyncio.to_thread(
            credentials.verify_password, msg.password, stored or _dummy_hash()
        )
        if not ok or stored is None or found is None or found[0].disabled:
            return None
        user = found[0]
        async with self._pool().acquire() as conn:
            await repo.record_login(conn, user.id)
        principal = Principal(user_id=user.id, role=user.role, name=user.username, via="session")
        return principal, found[2]

    @handles(m.CredentialStamp)
    async def _credential_stamp(self, msg: m.CredentialStamp) -> int | None:
        async with self._pool().acquire() as conn:
            found = await conn.fetchval(
                "SELECT credentials_version FROM users WHERE id = $1", msg.user_id
            )
        return None if found is None else int(found)

    @handles(m.SessionKey)
    async def _session_key(self, _msg: m.SessionKey) -> bytes:
        async with self._pool().acquire() as conn:
            found = await conn.fetchval(
                "SELECT value FROM jarvisd_info WHERE key = $1", SESSION_KEY
            )
        if found is None:
            raise RuntimeError("the login session key is missing: run jarvisd migrate")
        return bytes.fromhex(found)

    @handles(m.RotateSessionKey)
    async def _rotate_session_key(self, _msg: m.RotateSessionKey) -> None:
        async with self._pool().acquire() as conn:
            await conn.execute(
                "UPDATE jarvisd_info SET value = $2, created_at = now() WHERE key = $1",
                SESSION_KEY,
                secrets.token_hex(32),
            )

    # -- tokens --------------------------------------------------------------------------------
    @handles(m.CreateToken)
    async def _create_token(self, msg: m.CreateToken) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.create_token(conn, msg.user_id, msg.new, max_live=msg.max_live)

    @handles(m.ListTokens)
    async def _list_tokens(self, msg: m.ListTokens) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.list_tokens(conn, msg.user_id)

    @handles(m.RevokeToken)
    async def _revoke_token(self, msg: m.RevokeToken) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.revoke_token(conn, msg.user_id, msg.token_id)

    @handles(m.AuthenticateToken)
    async def _authenticate_token(self, msg: m.AuthenticateToken) -> Principal | None:
        async with self._pool().acquire() as conn:
            return await repo.authenticate_token(conn, msg.token)

    @handles(m.AuthenticateUser)
    async def _authenticate_user(self, msg: m.AuthenticateUser) -> Principal | None:
        async with self._pool().acquire() as conn:
            return await repo.principal_of(conn, msg.user_id, msg.via, msg.credentials_version)

    # -- agents on Redis ---------------------------------------------------------------------------
    @handles(m.CreateAgent)
    async def _create_agent(self, msg: m.CreateAgent) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.create_agent(conn, msg.name)

    @handles(m.ListAgents)
    async def _list_agents(self, _msg: m.ListAgents) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.list_agents(conn)

    @handles(m.RevokeAgent)
    async def _revoke_agent(self, msg: m.RevokeAgent) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.revoke_agent(conn, msg.name)

    @handles(m.EnsureAdmin)
    async def _ensure_admin(self, msg: m.EnsureAdmin) -> Any:
        async with self._pool().acquire() as conn, conn.transaction():
            # Several daemons may start at once on one database: one creates the admin.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _BOOTSTRAP_LOCK)
            if await repo.has_admin(conn):
                return None
            user = await repo.create_user(
                conn, UserCreate(username=msg.username, role="admin"), None
            )
            return await repo.create_token(conn, user.id, TokenCreate(name="bootstrap"))
