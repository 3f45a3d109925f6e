"""``jarvisd webhooks list|retry``: the ``[[webhooks]]`` endpoints through the
running daemon's API (``/webhooks``, as the local admin on its Unix socket).
Exit 0 on success, 1 when the daemon refuses or cannot be reached.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from jarvisd.cli_common import call_daemon, run_call

__all__ = ["add_parsers"]


def _line(h: dict[str, Any]) -> str:
    why = ""
    if h["state"] in ("dead", "retrying"):
        why = f"  {h['attempts']}/{h['maxAttempts']} attempts: {h['lastError'] or ''}"
    return (
        f"{h['name']:<20} {h['state']:<9} {h['lastId']:>10} {h['delivered']:>10} "
        f"{h['failures']:>9}  {h['url']}{why}"
    )


def cmd_list(args: argparse.Namespace) -> int:
    def work() -> int:
        hooks = call_daemon(args, "GET", "/webhooks")
        if args.json:
            print(json.dumps(hooks, indent=2))
            return 0
        if not hooks:
            print("no webhooks are configured ([[webhooks]] in the config file)")
            return 0
        print(
            f"{'NAME':<20} {'STATE':<9} {'DONE UP TO':>10} {'DELIVERED':>10} {'FAILURES':>9}  URL"
        )
        for h in hooks:
            print(_line(h))
        return 0

    return run_call("webhooks list", work)


def cmd_retry(args: argparse.Namespace) -> int:
    def work() -> int:
        h = call_daemon(args, "POST", f"/webhooks/{args.name}/retry")
        print(f"webhook {h['name']}: {h['state']}, sending again after event {h['lastId']}")
        return 0

    return run_call("webhooks retry", work)


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    hooks = sub.add_parser(
        "webhooks", help="the webhook endpoints: how far each got, retry a dead one"
    ).add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    ls = with_config(
        hooks.add_parser(
            "list",
            help="list the endpoints: state, the last event done, deliveries, failures",
        )
    )
    ls.add_argument("--json", action="store_true", help="print the endpoints as JSON")
    ls.set_defaults(func=cmd_list)
    retry = with_config(
        hooks.add_parser(
            "retry",
            help="send again to a dead endpoint, from the event it stopped at",
            description="A dead endpoint holds its place: retry makes it live again at the "
            "event it failed on (nothing is skipped). A retrying one tries at once.",
        )
    )
    retry.add_argument("name", help="the webhook's name in the config")
    retry.set_defaults(func=cmd_retry)
