"""``jarvisd user …`` and ``jarvisd token …`` (DESIGN §9, §13).

They work on the configured database whether or not a daemon runs, through
a persistence actor started for the command: the same messages, checks and
password hashing as the HTTP API. Exit 0 on success, 1 on a refused change
(with the reason on stderr), 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from actors import persistence as m
from actors.data.listing import parse_list
from actors.data.model import Page, TokenCreate, User, UserCreate, UserUpdate
from actors.data.repo import USERS, Conflict, NotFound
from actors.persistence import Persistence
from config import LoadedConfig
from jarvisd.cli_common import database_dsn, load, tell_daemons
from jarvisd.logs import configure
from jarvisd.principals import Invalidation

__all__ = [
    "cmd_logins_rotate_key",
    "cmd_token_create",
    "cmd_token_list",
    "cmd_token_revoke",
    "cmd_user_add",
    "cmd_user_disable",
    "cmd_user_list",
    "cmd_user_passwd",
]


@contextlib.asynccontextmanager
async def persistence(loaded: LoadedConfig) -> AsyncIterator[Persistence]:
    s = loaded.settings
    settings = msgspec.structs.replace(s.postgres, pool_min=1, pool_max=2, migrate_on_start=True)
    async with database_dsn(loaded) as dsn:
        actor = Persistence(settings, dsn, approvals=s.approvals)
        await actor.start()
        try:
            await actor.wait_ready(timeout=s.postgres.connect_timeout * 3)
            yield actor
        finally:
            await actor.stop()


def _password(args: argparse.Namespace) -> str | None:
    if getattr(args, "password_stdin", False):
        line = sys.stdin.readline().rstrip("\n")
        if not line:
            raise SystemExit("jarvisd: --password-stdin given but standard input is empty")
        return line
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise SystemExit("jarvisd: the passwords differ")
        return first
    return None


def _run(args: argparse.Namespace, work: Callable[[Persistence], Awaitable[int]]) -> int:
    loaded = load(args)
    # stdout carries the command's answer (a token, a table): logs go to stderr.
    configure("warning", "console" if sys.stderr.isatty() else "json", stream=sys.stderr)

    async def main() -> int:
        async with persistence(loaded) as actor:
            return await work(actor)

    try:
        return asyncio.run(main())
    except (NotFound, Conflict, ValueError) as exc:
        print(f"jarvisd: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("jarvisd: the database did not answer in time", file=sys.stderr)
        return 1


async def _all_users(actor: Persistence) -> AsyncIterator[User]:
    """Every user, page by page."""
    cursor = ""
    while True:
        query = parse_list(USERS, {"limit": ["200"], "cursor": [cursor]})
        page = await actor.ask(m.ListUsers(query=query), timeout=30)
        assert isinstance(page, Page)  # as_json is off: a page of User
        for user in page.items:
            yield user
        if not page.next_cursor:
            return
        cursor = page.next_cursor


async def _user(actor: Persistence, name: str) -> User:
    user: User = await actor.ask(m.GetUserByName(username=name), timeout=30)
    return user


def cmd_user_add(args: argparse.Namespace) -> int:
    password = _password(args) if args.password_stdin else None
    try:
        new = msgspec.convert(
            {"username": args.name, "role": args.role, "email": args.email, "password": password},
            UserCreate,
        )
    except msgspec.ValidationError as exc:
        print(f"jarvisd: {exc}", file=sys.stderr)
        return 1

    async def work(actor: Persistence) -> int:
        user = await actor.ask(m.CreateUser(new=new), timeout=30)
        print(f"created user {user.username} (id {user.id}, role {user.role})")
        return 0

    return _run(args, work)


def cmd_user_list(args: argparse.Namespace) -> int:
    async def work(actor: Persistence) -> int:
        print(f"{'ID':>6}  {'USERNAME':<24} {'ROLE':<9} {'STATE':<9} EMAIL")
        async for u in _all_users(actor):
            state = "disabled" if u.disabled else "enabled"
            print(f"{u.id:>6}  {u.username:<24} {u.role:<9} {state:<9} {u.email or ''}")
        return 0

    return _run(args, work)


def cmd_user_passwd(args: argparse.Namespace) -> int:
    password = _password(args)
    if password is None:
        print("jarvisd: give the password on standard input with --password-stdin", file=sys.stderr)
        return 1
    try:
        change = msgspec.convert({"password": password}, UserUpdate)
    except msgspec.ValidationError as exc:
        print(f"jarvisd: {exc}", file=sys.stderr)
        return 1

    async def work(actor: Persistence) -> int:
        user = await _user(actor, args.name)
        await actor.ask(m.UpdateUser(user_id=user.id, change=change), timeout=30)
        await tell_daemons(load(args), Invalidation(kind="user", user_id=user.id))
        print(f"password of {user.username} changed")
        return 0

    return _run(args, work)


def cmd_user_disable(args: argparse.Namespace) -> int:
    async def work(actor: Persistence) -> int:
        user = await _user(actor, args.name)
        await actor.ask(
            m.UpdateUser(user_id=user.id, change=UserUpdate(disabled=not args.enable)), timeout=30
        )
        await tell_daemons(load(args), Invalidation(kind="user", user_id=user.id))
        print(f"{user.username} {'enabled' if args.enable else 'disabled'}")
        return 0

    return _run(args, work)


def cmd_token_create(args: argparse.Namespace) -> int:
    async def work(actor: Persistence) -> int:
        user = await _user(actor, args.user)
        created = await actor.ask(
            m.CreateToken(
                user_id=user.id,
                new=TokenCreate(name=args.name),
                max_live=load(args).settings.auth.max_tokens_per_user,
            ),
            timeout=30,
        )
        print(created.token)  # alone on stdout, for scripts
        print(
            f"token {created.info.id} ({created.info.prefix}...) for {user.username}; it is shown only once",
            file=sys.stderr,
        )
        return 0

    return _run(args, work)


def _when(moment: Any) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M")


def cmd_token_list(args: argparse.Namespace) -> int:
    async def work(actor: Persistence) -> int:
        users = (
            [await _user(actor, args.user)] if args.user else [u async for u in _all_users(actor)]
        )
        print(
            f"{'ID':>6}  {'USER':<20} {'NAME':<16} {'PREFIX':<12} "
            f"{'CREATED':<16}  {'LAST USED':<16}  STATE"
        )
        for user in users:
            for t in await actor.ask(m.ListTokens(user_id=user.id), timeout=30):
                expired = t.expires_at is not None and t.expires_at < datetime.now(UTC)
                state = "revoked" if t.revoked_at else "expired" if expired else "live"
                print(
                    f"{t.id:>6}  {user.username:<20} {t.name:<16} {t.prefix + '...':<12} "
                    f"{_when(t.created_at):<16}  {_when(t.last_used_at):<16}  {state}"
                )
        return 0

    return _run(args, work)


def cmd_token_revoke(args: argparse.Namespace) -> int:
    async def work(actor: Persistence) -> int:
        token = await actor.ask(m.RevokeToken(token_id=args.id), timeout=30)
        await tell_daemons(load(args), Invalidation(kind="user", user_id=token.user_id))
        print(f"revoked token {token.id} ({token.prefix}...) of user {token.user_id}")
        return 0

    return _run(args, work)


def cmd_logins_rotate_key(args: argparse.Namespace) -> int:
    async def work(actor: Persistence) -> int:
        await actor.ask(m.RotateSessionKey(), timeout=30)
        await tell_daemons(load(args), Invalidation(kind="all"))
        print("login session key rotated: every login session has ended (log in again)")
        return 0

    return _run(args, work)
