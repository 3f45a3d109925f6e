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

__all__ = ["add_parsers"]


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
        lq = parse_list(USERS, {"limit": ["200"]})
        page = await actor.ask(m.ListUsers(query=lq), timeout=30)
        assert isinstance(page, Page)  # as_json is off: a page of User
        print(f"{'ID':>6}  {'USERNAME':<24} {'ROLE':<9} {'STATE':<9} EMAIL")
        for u in page.items:
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


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    user = sub.add_parser("user", help="manage users").add_subparsers(
        dest="user_command", required=True, metavar="ACTION"
    )
    add = with_config(user.add_parser("add", help="create a user"))
    add.add_argument("name")
    add.add_argument("--role", default="user", choices=["admin", "approver", "user", "agent"])
    add.add_argument("--email")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    add.set_defaults(func=cmd_user_add)
    with_config(user.add_parser("list", help="list users")).set_defaults(func=cmd_user_list)
    passwd = with_config(user.add_parser("passwd", help="set a user's password"))
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true")
    passwd.set_defaults(func=cmd_user_passwd)
    disable = with_config(user.add_parser("disable", help="disable a user (--enable to undo)"))
    disable.add_argument("name")
    disable.add_argument("--enable", action="store_true")
    disable.set_defaults(func=cmd_user_disable)

    token = sub.add_parser("token", help="manage API tokens").add_subparsers(
        dest="token_command", required=True, metavar="ACTION"
    )
    create = with_config(
        token.add_parser("create", help="create a token; prints it alone on stdout")
    )
    create.add_argument("--user", required=True)
    create.add_argument("--name", default="cli")
    create.set_defaults(func=cmd_token_create)
    revoke = with_config(token.add_parser("revoke", help="revoke a token by id"))
    revoke.add_argument("id", type=int)
    revoke.set_defaults(func=cmd_token_revoke)

    logins = sub.add_parser("logins", help="login sessions").add_subparsers(
        dest="logins_command", required=True, metavar="ACTION"
    )
    with_config(
        logins.add_parser(
            "rotate-key",
            help="replace the key login sessions are signed with: every login session ends",
        )
    ).set_defaults(func=cmd_logins_rotate_key)
