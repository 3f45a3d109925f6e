"""The parsers of ``jarvisd user``, ``token`` and ``logins`` (the commands
themselves are ``cli_users``, imported when one of them runs: the database
layer it loads is not for ``--help`` or the other commands)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["add_parsers"]


def _lazy(name: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from jarvisd import cli_users

        result: int = getattr(cli_users, name)(args)
        return result

    command.__name__ = name
    return command


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    user = sub.add_parser("user", help="manage users").add_subparsers(
        dest="user_command", required=True, metavar="ACTION"
    )
    add = with_config(user.add_parser("add", help="create a user"))
    add.add_argument("name", help="the user name (letters, digits, . _ -)")
    add.add_argument(
        "--role",
        required=True,
        choices=["admin", "approver", "user", "agent"],
        help="admin: everything; approver: decides approvals; user: its own commands; "
        "agent: sends commands (jarvisd agent add gives it Redis credentials)",
    )
    add.add_argument("--email", help="an address kept with the user (optional)")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (without it and on a terminal: "
        "prompted; else the user has no password and logs in by token only)",
    )
    add.set_defaults(func=_lazy("cmd_user_add"))
    with_config(user.add_parser("list", help="list users")).set_defaults(
        func=_lazy("cmd_user_list")
    )
    passwd = with_config(user.add_parser("passwd", help="set a user's password"))
    passwd.add_argument("name", help="the user name")
    passwd.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (default: prompted on a terminal)",
    )
    passwd.set_defaults(func=_lazy("cmd_user_passwd"))
    disable = with_config(user.add_parser("disable", help="disable a user (--enable to undo)"))
    disable.add_argument("name", help="the user name")
    disable.add_argument("--enable", action="store_true", help="enable the user again instead")
    disable.set_defaults(func=_lazy("cmd_user_disable"))

    token = sub.add_parser("token", help="manage API tokens").add_subparsers(
        dest="token_command", required=True, metavar="ACTION"
    )
    create = with_config(
        token.add_parser("create", help="create a token; prints it alone on stdout")
    )
    create.add_argument("--user", required=True, help="the user the token acts as")
    create.add_argument(
        "--name", default="cli", help="a label that says where it is used (default cli)"
    )
    create.set_defaults(func=_lazy("cmd_token_create"))
    ls = with_config(
        token.add_parser("list", help="list tokens: id, user, label, prefix, last use, state")
    )
    ls.add_argument("--user", help="only this user's tokens (default: every user's)")
    ls.set_defaults(func=_lazy("cmd_token_list"))
    revoke = with_config(
        token.add_parser("revoke", help="revoke a token by id (jarvisd token list shows ids)")
    )
    revoke.add_argument("id", type=int, help="the token's id")
    revoke.set_defaults(func=_lazy("cmd_token_revoke"))

    logins = sub.add_parser("logins", help="login sessions").add_subparsers(
        dest="logins_command", required=True, metavar="ACTION"
    )
    with_config(
        logins.add_parser(
            "rotate-key",
            help="replace the key login sessions are signed with: every login session ends",
        )
    ).set_defaults(func=_lazy("cmd_logins_rotate_key"))
