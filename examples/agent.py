"""A small jarvisd agent: the whole approval loop, end to end.

1. It makes a scratch file of its own, then asks jarvisd (on Redis, on its
   own inbox stream, with the credentials ``jarvisd agent add`` gave it) to
   delete it: ``delete_file`` is HIGH risk under the default policy, so the
   command waits for a person's approval.
2. It waits for the decision two ways: the ``approval.decided`` event on the
   ``jarvis:approvals`` channel (fast, but a notification: it can be missed)
   and ``GET /approvals/{id}?wait=55`` (the authority; safe to repeat).
3. Approved: it reports ``command.started``, deletes its scratch file (the
   harmless action), and reports ``command.completed`` with the result and
   the duration, then reads the command back. Rejected or expired: it says
   why and stops.

Needs only redis and aiohttp. Run it beside a daemon (see the quickstart in README.md):

    AGENT_URL=$(.venv/bin/jarvisd agent add demo-agent)
    TOKEN=$(.venv/bin/jarvisd token create --user demo-agent)
    .venv/bin/python examples/agent.py --redis "$AGENT_URL" --token "$TOKEN"

Its name (and so its inbox, ``<prefix>inbox:<name>:{<prefix>inbox}``) comes
from the Redis user in the URL. jarvisd knows who sent an envelope from the
inbox it arrived on; the events it publishes say so in ``sender``
(``agent:<name>``), and the agent matches its own by ``requestId`` and
``sender``. Why an envelope was refused comes on ``<prefix>inbox:<name>:replies``.

Exit status: 0 done, 3 rejected or expired, 1 an error (the daemon
unreachable, no decision within --timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import redis.asyncio as aioredis


def say(text: str) -> None:
    print(f"agent: {text}", flush=True)


def envelope(kind: str, envelope_id: str, data: dict[str, Any]) -> str:
    return json.dumps(
        {
            "v": 1,
            "id": envelope_id,
            "type": kind,
            "source": "example-agent",
            "ts": datetime.now(UTC).isoformat(),
            "data": data,
        }
    )


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = args.prefix
        user = unquote(urlsplit(args.redis).username or "")
        self.name = args.name or user.rpartition("agent:")[2]
        if not self.name:
            raise RuntimeError("no agent name: give --name, or the URL jarvisd agent add printed")
        self.sender = f"agent:{self.name}"
        shared = f"{self.prefix}inbox"
        self.inbox = f"{shared}:{self.name}:{{{shared}}}"
        self.replies = f"{shared}:{self.name}:replies"
        self.redis = aioredis.Redis.from_url(args.redis, socket_connect_timeout=5)
        self.http = aiohttp.ClientSession(
            base_url=args.url,
            headers={"Authorization": f"Bearer {args.token}"},
            timeout=aiohttp.ClientTimeout(total=70),
        )
        self.decided_on_redis = asyncio.Event()

    async def close(self) -> None:
        await self.http.close()
        await self.redis.aclose()

    async def get(self, path: str) -> Any:
        async with self.http.get(path) as resp:
            doc = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: {resp.status} {doc.get('detail', doc)}")
            return doc

    async def send(self, kind: str, envelope_id: str, data: dict[str, Any]) -> None:
        """XADD on our own inbox: recorded exactly once (the envelope id is the key)."""
        await self.redis.xadd(self.inbox, {"envelope": envelope(kind, envelope_id, data)})

    async def watch_events(self, request_id: str, ready: asyncio.Event) -> None:
        """Print the approval events about our request as they are published,
        and anything of ours the daemon refused."""
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(f"{self.prefix}approvals", self.replies)
        ready.set()
        try:
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                event = json.loads(message["data"])
                if event.get("type") == "envelope.refused":
                    say(f"[redis] refused: {event.get('id')}: {event.get('reason')}")
                    continue
                data = event.get("data", {})
                # requestIds are ours alone: another sender may use the same one.
                if data.get("requestId") != request_id or data.get("sender") != self.sender:
                    continue
                who = data.get("decider") or data.get("decidedBy") or ""
                extra = f" by {who}" if who else ""
                reason = f" ({data['reason']})" if data.get("reason") else ""
                say(f"[redis] {event['type']} {data.get('decision', '')}{extra}{reason}".rstrip())
                if event["type"] in ("approval.decided", "approval.expired"):
                    self.decided_on_redis.set()
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def find_command(self, request_id: str) -> dict[str, Any]:
        """The command our envelope became (the bus records it within moments)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            page = await self.get(
                f"/commands?requestId={quote(request_id)}&sender={quote(self.sender)}"
            )
            if page["items"]:
                return dict(page["items"][0])
            await asyncio.sleep(0.2)
        raise RuntimeError(
            f"no command with requestId {request_id} after 30 s: is jarvisd running?"
        )

    async def wait_for_decision(self, approval_id: int) -> dict[str, Any]:
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline:
            wait = max(1, min(55, int(deadline - time.monotonic())))
            approval = await self.get(f"/approvals/{approval_id}?wait={wait}")
            if approval["status"] != "pending":
                return dict(approval)
        raise RuntimeError(f"no decision on approval {approval_id} within {self.args.timeout} s")

    async def run(self) -> int:
        scratch_dir = Path(tempfile.mkdtemp(prefix="jarvisd-agent-"))
        scratch = scratch_dir / "old-notes.txt"
        scratch.write_text("notes nobody needs any more\n")
        request_id = f"agent-{uuid.uuid4().hex[:12]}"
        ready = asyncio.Event()
        watcher = asyncio.create_task(self.watch_events(request_id, ready))
        try:
            await ready.wait()
            await self.send(
                "command.requested",
                request_id,
                {
                    "action": self.args.action,
                    "type": "agent",
                    "parameters": {"path": str(scratch)},
                    "description": f"Delete the scratch file {scratch.name}",
                },
            )
            say(f"asked to {self.args.action} {scratch} (requestId {request_id})")
            command = await self.find_command(request_id)
            if command["status"] == "awaiting_approval":
                approval_id = command["approvalId"]
                say(
                    f"command {command['id']} is {command['riskCategory']} "
                    f"({command['riskScore']}): waiting for approval {approval_id}; "
                    f"approve it with: jarvisd approvals approve {approval_id}"
                )
                approval = await self.wait_for_decision(approval_id)
                say(f"[long-poll] approval {approval_id} {approval['status']}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.decided_on_redis.wait(), 2)
                if approval["status"] != "approved":
                    say(f"not doing it: {approval['status']} ({approval.get('reason') or ''})")
                    return 3
            else:
                say(f"command {command['id']} is {command['status']} ({command['riskCategory']})")
            if command["status"] not in ("approved", "awaiting_approval"):
                return 3
            await self.send("command.started", f"{request_id}-started", {"requestId": request_id})
            began = time.perf_counter()
            scratch.unlink()  # the action itself: our own scratch file
            scratch_dir.rmdir()
            duration_ms = round((time.perf_counter() - began) * 1000) + 1
            await self.send(
                "command.completed",
                f"{request_id}-done",
                {
                    "requestId": request_id,
                    "result": {"deleted": str(scratch)},
                    "durationMs": duration_ms,
                },
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                final = await self.get(f"/commands/{command['id']}")
                if final["status"] == "succeeded":
                    say(
                        f"command {final['id']} succeeded in {final['durationMs']} ms: "
                        f"{json.dumps(final['result'])}"
                    )
                    return 0
                await asyncio.sleep(0.2)
            raise RuntimeError(f"command {command['id']} not recorded as succeeded after 30 s")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if scratch.exists():
                scratch.unlink()
            with contextlib.suppress(OSError):
                scratch_dir.rmdir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis",
        default=os.environ.get("JARVISD_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="this agent's Redis URL, from `jarvisd agent add NAME` (default $JARVISD_REDIS_URL)",
    )
    parser.add_argument(
        "--name", help="this agent's name (default: from the Redis user in --redis)"
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("JARVISD_URL", "http://127.0.0.1:8017"),
        help="the daemon's API (default $JARVISD_URL, else http://127.0.0.1:8017)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("JARVISD_AGENT_TOKEN"),
        help="an API token of an agent user (default $JARVISD_AGENT_TOKEN)",
    )
    parser.add_argument("--prefix", default="jarvis:", help="redis.prefix (default jarvis:)")
    parser.add_argument("--action", default="delete_file", help="the action to ask for")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds to wait for a decision (default 900)"
    )
    args = parser.parse_args()
    if not args.token:
        parser.error("an agent token is needed: --token or $JARVISD_AGENT_TOKEN")

    async def run() -> int:
        agent = Agent(args)
        try:
            return await agent.run()
        finally:
            await agent.close()

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, OSError, aiohttp.ClientError, aioredis.RedisError) as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
