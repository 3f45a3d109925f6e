"""Handlers of the data messages; mixed into the persistence actor."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import asyncpg
import msgspec

from actors.data import credentials, repo
from actors.data import messages as m
from actors.data.model import Principal, TokenCreate, UserCreate
from actors.kernel import handles
from config import ApprovalSettings

_BOOTSTRAP_LOCK = (
    int.from_bytes(hashlib.sha256(b"jarvisd.bootstrap-admin").digest()[:8], "big") >> 1
)


class DataHandlers:
    """Requires ``self._pool()`` and ``self.approvals`` from the actor."""

    approvals: ApprovalSettings

    def _pool(self) -> asyncpg.Pool:
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
            return await repo.list_users(conn, msg.query, msg.count)

    @handles(m.UpdateUser)
    async def _update_user(self, msg: m.UpdateUser) -> Any:
        hashed = None
        if msg.change.password is not msgspec.UNSET:
            hashed = await asyncio.to_thread(credentials.hash_password, msg.change.password)
        async with self._pool().acquire() as conn:
            return await repo.update_user(conn, msg.user_id, msg.change, hashed)

    @handles(m.DeleteUser)
    async def _delete_user(self, msg: m.DeleteUser) -> None:
        async with self._pool().acquire() as conn:
            await repo.delete_user(conn, msg.user_id)

    @handles(m.CheckPassword)
    async def _check_password(self, msg: m.CheckPassword) -> Principal | None:
        async with self._pool().acquire() as conn:
            found = await repo.password_hash_of(conn, msg.username)
        # Hash even for an unknown user, so timing does not tell which names exist.
        stored = (
            found[1]
            if found
            else "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
        )
        ok = await asyncio.to_thread(credentials.verify_password, msg.password, stored)
        if not ok or found is None or found[0].disabled:
            return None
        user = found[0]
        async with self._pool().acquire() as conn:
            await repo.record_login(conn, user.id)
        return Principal(user_id=user.id, role=user.role, name=user.username, via="session")

    # -- tokens --------------------------------------------------------------------------------
    @handles(m.CreateToken)
    async def _create_token(self, msg: m.CreateToken) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.create_token(conn, msg.user_id, msg.new)

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

    # -- commands -------------------------------------------------------------------------------
    @handles(m.CreateCommand)
    async def _create_command(self, msg: m.CreateCommand) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.create_command(
                conn,
                msg.new,
                msg.user_id,
                threshold=self.approvals.threshold,
                expiry=self.approvals.expiry,
            )

    @handles(m.GetCommand)
    async def _get_command(self, msg: m.GetCommand) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.get_command(conn, msg.command_id)

    @handles(m.ListCommands)
    async def _list_commands(self, msg: m.ListCommands) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.list_commands(conn, msg.query, msg.count)

    @handles(m.UpdateCommandStatus)
    async def _update_command_status(self, msg: m.UpdateCommandStatus) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.update_command_status(conn, msg.command_id, msg.change, msg.actor_id)

    @handles(m.InsertCommands)
    async def _insert_commands(self, msg: m.InsertCommands) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.insert_commands_batch(
                conn, list(msg.rows), list(msg.user_ids), threshold=self.approvals.threshold
            )

    # -- approvals -------------------------------------------------------------------------------
    @handles(m.CreateApproval)
    async def _create_approval(self, msg: m.CreateApproval) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.create_approval(
                conn, msg.new, msg.requester_id, expiry=self.approvals.expiry
            )

    @handles(m.GetApproval)
    async def _get_approval(self, msg: m.GetApproval) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.get_approval(conn, msg.approval_id)

    @handles(m.ListApprovals)
    async def _list_approvals(self, msg: m.ListApprovals) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.list_approvals(conn, msg.query, msg.count)

    @handles(m.DecideApproval)
    async def _decide_approval(self, msg: m.DecideApproval) -> Any:
        async with self._pool().acquire() as conn:
            return await repo.decide_approval(
                conn, msg.approval_id, msg.decision, msg.who, msg.reason
            )

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
