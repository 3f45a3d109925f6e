"""``jarvisd approvals list|show|approve|reject``: the approval workflow for a
person at the host, through the running daemon's API (the same rules as the
routes: no self-approval, CRITICAL needs an admin, a decided request is 409).

On the daemon's Unix socket the caller is the local admin (recorded as the
decider ``uid:<uid>``); with ``--token`` or ``$JARVISD_TOKEN`` the caller is that
token's user, which is what the audit trail will name. Exit 0 on success,
1 when the daemon refuses (the reason on stderr) or cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from jarvisd import cli_show as show
from jarvisd.cli_common import Refused, call_daemon, run_call

__all__ = ["add_parsers"]


def _run(name: str, work: Callable[[], Any]) -> int:
    return run_call(f"approvals {name}", work)


_call = call_daemon


def cmd_list(args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit), "order": "createdAt"}
    if args.status:
        query["status"] = args.status

    def work() -> int:
        page = _call(args, "GET", "/approvals?" + urllib.parse.urlencode(query))
        items = page["items"]
        if args.json:
            print(json.dumps(items, indent=2))
        elif args.quiet:
            for item in items:
                print(item["id"])
        else:
            print(show.table(items, datetime.now(UTC)))
        return 0

    return _run("list", work)


def cmd_show(args: argparse.Namespace) -> int:
    wait = f"?wait={args.wait}" if args.wait else ""

    def work() -> int:
        approval = _call(args, "GET", f"/approvals/{args.id}{wait}", timeout=args.wait + 15)
        if args.json:
            print(json.dumps(approval, indent=2))
            return 0
        history = _call(args, "GET", f"/approvals/{args.id}/history")
        command = None
        if approval.get("commandId") is not None:
            with contextlib.suppress(Refused):  # deleted since: the request alone
                command = _call(args, "GET", f"/commands/{approval['commandId']}")
        print(show.detail(approval, command, history["items"], datetime.now(UTC)))
        return 0

    return _run("show", work)


def _decide(verb: str) -> Callable[[argparse.Namespace], int]:
    def cmd(args: argparse.Namespace) -> int:
        body = {"reason": args.reason} if args.reason is not None else None

        def work() -> int:
            decided = _call(args, "PUT", f"/approvals/{args.id}/{verb}", body)
            print(show.outcome(decided))
            return 0

        return _run(verb, work)

    return cmd


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    approvals = sub.add_parser(
        "approvals", help="list and decide approval requests (through the daemon)"
    ).add_subparsers(dest="approvals_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_config(p)
        p.add_argument(
            "--token", help="API token (default $JARVISD_TOKEN; none: the Unix socket as admin)"
        )
        return p

    ls = common(approvals.add_parser("list", help="list requests, oldest first"))
    ls.add_argument(
        "--status",
        default="pending",
        help="comma list: pending, approved, rejected, expired, cancelled; '' for all "
        "(default pending)",
    )
    ls.add_argument("--limit", type=int, default=50, help="at most this many (1-200, default 50)")
    fmt = ls.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the requests as JSON")
    fmt.add_argument("-q", "--quiet", action="store_true", help="print the ids alone")
    ls.set_defaults(func=cmd_list)
    one = common(
        approvals.add_parser(
            "show", help="everything about one request: parameters, rule, people, history"
        )
    )
    one.add_argument("id", type=int, help="the request's id (jarvisd approvals list shows them)")
    one.add_argument("--json", action="store_true", help="print the request as JSON")
    one.add_argument(
        "--wait",
        type=int,
        default=0,
        metavar="SECONDS",
        help="wait up to this long (0-55) for a pending request to be decided",
    )
    one.set_defaults(func=cmd_show)
    approve = common(approvals.add_parser("approve", help="approve a pending request"))
    approve.add_argument("id", type=int, help="the request's id")
    approve.add_argument("--reason", help="an optional note kept with the decision")
    approve.set_defaults(func=_decide("approve"))
    reject = common(approvals.add_parser("reject", help="reject a pending request"))
    reject.add_argument("id", type=int, help="the request's id")
    reject.add_argument("--reason", required=True, help="why (required)")
    reject.set_defaults(func=_decide("reject"))
