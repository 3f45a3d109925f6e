"""``jarvisd publish`` and ``jarvisd subscribe``: pub/sub for scripts, through
the running daemon's API (the same rules as POST /publish and /ws).

The daemon is reached on its Unix socket when there is one (the local admin,
by peer credentials), else on its TCP port with ``--token`` or
``$JARVISD_TOKEN``. ``publish`` prints how many received the message.
``subscribe`` says on stderr what it subscribed to, prints one JSON object per
line on stdout, flushed, and exits 0 on Ctrl-C, 1 if the daemon goes away.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from jarvisd.cli_common import client_session, daemon_endpoint, load, reach, run_call, token_from

__all__ = ["add_parsers"]


def cmd_publish(args: argparse.Namespace) -> int:
    import aiohttp

    try:
        message = json.loads(args.message)
    except json.JSONDecodeError as exc:
        print(f"jarvisd publish: the message is not JSON: {exc}", file=sys.stderr)
        return 2
    socket_path, base, headers = daemon_endpoint(load(args), token_from(args))

    async def run() -> int:
        async with (
            reach(socket_path, base),
            client_session(socket_path, timeout=aiohttp.ClientTimeout(total=15)) as s,
            s.post(
                f"{base}/publish",
                json={"channel": args.channel, "message": message},
                headers=headers,
            ) as resp,
        ):
            body = await resp.json(content_type=None)
            if resp.status != 200:
                print(
                    f"jarvisd publish: {resp.status}: {body.get('detail', body)}", file=sys.stderr
                )
                return 1
            n = body["receivers"]
            print(f"published on {args.channel}: {n} receiver{'' if n == 1 else 's'}")
            return 0

    return run_call("publish", run)


def cmd_subscribe(args: argparse.Namespace) -> int:
    import aiohttp

    if args.since is not None:
        if args.channels or args.pattern:
            print(
                "jarvisd subscribe: --since reads the event log (GET /events); give no channels",
                file=sys.stderr,
            )
            return 2
        return _follow_log(args)
    socket_path, base, headers = daemon_endpoint(load(args), token_from(args))

    async def run() -> int:
        async with (
            reach(socket_path, base),
            client_session(socket_path) as s,
            s.ws_connect(f"{base}/ws", headers=headers, heartbeat=30) as ws,
        ):
            await ws.send_json(
                {"op": "subscribe", "channels": args.channels, "patterns": args.pattern or []}
            )
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                doc: dict[str, Any] = json.loads(msg.data)
                if doc.get("type") == "error":
                    print(
                        f"jarvisd subscribe: {doc.get('error')} {doc.get('refused', '')}",
                        file=sys.stderr,
                    )
                    return 1
                if doc.get("type") == "subscribed":
                    names = [*doc.get("channels", []), *doc.get("patterns", [])]
                    print(f"subscribed to {', '.join(names)} (Ctrl-C stops)", file=sys.stderr)
                elif doc.get("type") in ("message", "subscription.gap"):
                    sys.stdout.write(json.dumps(doc) + "\n")
                    sys.stdout.flush()
            reason = ws.close_code
            print(
                f"jarvisd subscribe: the daemon closed the connection ({reason})", file=sys.stderr
            )
            return 1

    try:
        return run_call("subscribe", run)
    except KeyboardInterrupt:
        return 0


def _follow_log(args: argparse.Namespace) -> int:
    """Every event after ``--since`` from the durable log, then each new one
    as it commits (long-polls), one JSON object per line."""
    import aiohttp

    socket_path, base, headers = daemon_endpoint(load(args), token_from(args))
    kind = f"&kind={args.kind}" if args.kind else ""

    async def run() -> int:
        since = args.since
        async with (
            reach(socket_path, base),
            client_session(socket_path, timeout=aiohttp.ClientTimeout(total=60)) as s,
        ):
            print(f"following the event log after {since} (Ctrl-C stops)", file=sys.stderr)
            while True:
                async with s.get(
                    f"{base}/events?since={since}&wait=25&limit=1000{kind}", headers=headers
                ) as resp:
                    page = await resp.json(content_type=None)
                    if resp.status != 200:
                        detail = page.get("detail", page) if isinstance(page, dict) else page
                        print(f"jarvisd subscribe: {resp.status}: {detail}", file=sys.stderr)
                        return 1
                if page["gap"]:
                    gap = {
                        "type": "subscription.gap",
                        "reason": f"events after {since} were pruned",
                    }
                    sys.stdout.write(json.dumps(gap) + "\n")
                for event in page["events"]:
                    sys.stdout.write(json.dumps(event) + "\n")
                sys.stdout.flush()
                since = page["next"]

    try:
        return run_call("subscribe", run)
    except KeyboardInterrupt:
        return 0


def add_parsers(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    pub = with_config(sub.add_parser("publish", help="publish a JSON message on a channel"))
    pub.add_argument("channel", help="the channel (see pubsub.channels for the allowed ones)")
    pub.add_argument("message", help='a JSON value, e.g. \'{"event": "login"}\'')
    pub.add_argument("--token", help="API token (default $JARVISD_TOKEN; none: the Unix socket)")
    pub.set_defaults(func=cmd_publish)
    s = with_config(
        sub.add_parser("subscribe", help="print messages of channels, one JSON per line")
    )
    s.add_argument("channels", nargs="*", metavar="CHANNEL", help="channels to subscribe to")
    s.add_argument("--pattern", action="append", metavar="GLOB", help="a pattern too (repeatable)")
    s.add_argument(
        "--since",
        type=int,
        metavar="ID",
        help="read the durable event log after this event id (0: all kept), then follow it",
    )
    s.add_argument(
        "--kind", choices=["commands", "approvals"], help="with --since: only events of this kind"
    )
    s.add_argument("--token", help="API token (default $JARVISD_TOKEN; none: the Unix socket)")
    s.set_defaults(func=cmd_subscribe)
