"""``jarvisd agent add|list|revoke``: agents on Redis, each with credentials
of its own, through the running daemon's API (``/agents``, as the local
admin on its Unix socket). Exit 0 on success, 1 when the daemon refuses or
cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from jarvisd.cli_common import call_daemon, run_call

__all__ = ["add_parsers"]


def cmd_add(args: argparse.Namespace) -> int:
    def work() -> int:
        made = call_daemon(args, "POST", "/agents", {"name": args.name})
        agent = made["agent"]
        print(made["redisUrl"])  # alone on stdout, for scripts: shown once
        print(
            f"agent {agent['name']}: its Redis URL above is shown once.\n"
            f"  send:     XADD {agent['inbox']} * envelope <json>  (or PUBLISH on it)\n"
            f"  replies:  SUBSCRIBE {agent['replies']}  (why an envelope was refused)\n"
            f"  commands record sender {agent['sender']}",
            file=sys.stderr,
        )
        if not made["aclsManaged"]:
            print(
                f"jarvisd does not manage Redis' ACL here ({made.get('aclError') or 'off'}): "
                "apply this on every Redis node before the agent connects:",
                file=sys.stderr,
            )
            for line in made["acl"]:
                print(f"  {line}", file=sys.stderr)
        return 0

    return run_call("agent add", work)


def cmd_list(args: argparse.Namespace) -> int:
    def work() -> int:
        agents = call_daemon(args, "GET", "/agents")
        if args.json:
            print(json.dumps(agents, indent=2))
            return 0
        print(f"{'NAME':<24} {'STATE':<8} INBOX")
        for a in agents:
            state = "revoked" if a["revokedAt"] else "active"
            print(f"{a['name']:<24} {state:<8} {a['inbox']}")
        return 0

    return run_call("agent list", work)


def cmd_revoke(args: argparse.Namespace) -> int:
    def work() -> int:
        done = call_daemon(args, "DELETE", f"/agents/{args.name}")
        name = done["agent"]["name"]
        if done["aclsManaged"]:
            print(f"agent {name}: Redis credentials revoked, its connections closed")
            return 0
        print(f"agent {name}: revoked; its inbox is no longer read")
        print(
            "jarvisd does not manage Redis' ACL here: remove its user on every Redis node:",
            file=sys.stderr,
        )
        for line in done["acl"]:
            print(f"  {line}", file=sys.stderr)
        return 0

    return run_call("agent revoke", work)


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    agent = sub.add_parser(
        "agent", help="agents on Redis, each with credentials of its own (through the daemon)"
    ).add_subparsers(dest="agent_command", required=True, metavar="ACTION")
    add = with_config(
        agent.add_parser(
            "add",
            help="give an agent Redis credentials; prints its Redis URL alone on stdout (once)",
            description="Creates the user NAME (role agent) if needed and a Redis user that "
            "may only append to the agent's own inbox and use the channels an agent may.",
        )
    )
    add.add_argument("name", help="the agent's name (a user name)")
    add.set_defaults(func=cmd_add)
    ls = with_config(agent.add_parser("list", help="list agents and their inboxes"))
    ls.add_argument("--json", action="store_true", help="print the agents as JSON")
    ls.set_defaults(func=cmd_list)
    revoke = with_config(
        agent.add_parser(
            "revoke", help="revoke an agent's Redis credentials (closes its connections)"
        )
    )
    revoke.add_argument("name", help="the agent's name")
    revoke.set_defaults(func=cmd_revoke)
