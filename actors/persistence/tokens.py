"""API tokens, and who a credential belongs to: the messages and their handlers."""

from __future__ import annotations

from typing import Literal

from actors.data import repo
from actors.data.model import Principal, Token, TokenCreate, TokenCreated
from actors.persistence.base import PgMessage, Store, room

__all__ = [
    "AuthenticateToken",
    "AuthenticateUser",
    "CreateToken",
    "ListTokens",
    "RevokeToken",
    "tokens",
]

tokens = room("tokens")


class CreateToken(PgMessage[TokenCreated], frozen=True):
    """A new token of the user's (shown once: only its hash is kept)."""

    user_id: int
    new: TokenCreate
    max_live: int = 100  # auth.max_tokens_per_user


@tokens.handles(CreateToken)
async def create_token(db: Store, msg: CreateToken) -> TokenCreated:
    async with db.pool().acquire() as conn:
        return await repo.create_token(conn, msg.user_id, msg.new, max_live=msg.max_live)


class ListTokens(PgMessage[list[Token]], frozen=True):
    user_id: int


@tokens.handles(ListTokens)
async def list_tokens(db: Store, msg: ListTokens) -> list[Token]:
    async with db.pool().acquire() as conn:
        return await repo.list_tokens(conn, msg.user_id)


class RevokeToken(PgMessage[Token], frozen=True):
    token_id: int
    user_id: int | None = None  # None: any user's (admins)


@tokens.handles(RevokeToken)
async def revoke_token(db: Store, msg: RevokeToken) -> Token:
    async with db.pool().acquire() as conn:
        return await repo.revoke_token(conn, msg.user_id, msg.token_id)


class AuthenticateToken(PgMessage[Principal | None], frozen=True):
    """The Principal of a live API token, else None."""

    token: str


@tokens.handles(AuthenticateToken)
async def authenticate_token(db: Store, msg: AuthenticateToken) -> Principal | None:
    async with db.pool().acquire() as conn:
        return await repo.authenticate_token(conn, msg.token)


class AuthenticateUser(PgMessage[Principal | None], frozen=True):
    """The Principal of an enabled user whose credentials version is still
    ``credentials_version`` (when given), else None (session authentication)."""

    user_id: int
    via: Literal["session"] = "session"
    credentials_version: int | None = None


@tokens.handles(AuthenticateUser)
async def authenticate_user(db: Store, msg: AuthenticateUser) -> Principal | None:
    async with db.pool().acquire() as conn:
        return await repo.principal_of(conn, msg.user_id, msg.via, msg.credentials_version)
