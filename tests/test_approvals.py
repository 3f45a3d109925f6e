"""The approval workflow end to end on an in-process daemon with real
PostgreSQL and Redis: an agent's command on the inbox stream, a person's
decision over the API, the events on Redis, the long-poll, expiry."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from config import LoadedConfig, load_settings
from tests.servers import Servers
from tests.test_api import Api, serve_api
from tests.test_bus import BUS, requested, status
from tests.test_config import run_cli
from tests.test_http import start_daemon


@pytest.fixture
def approval_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def api(
    make_config: Callable[..., LoadedConfig], approval_overrides: dict[str, Any]
) -> AsyncIterator[Api]:
    loaded = make_config(
        bus=BUS, approvals={"default_score": 0, "sweep_interval": 0.2, **approval_overrides}
    )
    async for client in serve_api(loaded):
        yield client


class Events:
    """What an agent sees on the daemon's channels."""

    def __init__(self, raw: aioredis.Redis, prefix: str) -> None:
        self.pubsub = raw.pubsub()
        self.prefix = prefix
        self.seen: list[tuple[str, dict[str, Any]]] = []

    async def start(self) -> None:
        await self.pubsub.subscribe(f"{self.prefix}approvals", f"{self.prefix}commands")

    async def wait_for(
        self, channel: str, kind: str, timeout: float = 15, **data: Any
    ) -> dict[str, Any]:
        def match() -> dict[str, Any] | None:
            for ch, event in self.seen:
                fields = event["data"]
                if (
                    ch == self.prefix + channel
                    and event["type"] == kind
                    and all(fields.get(k) == v for k, v in data.items())
                ):
                    return event
            return None

        async with asyncio.timeout(timeout):
            while (found := match()) is None:
                msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if msg is not None:
                    self.seen.append((msg["channel"].decode(), json.loads(msg["data"])))
        return found

    async def close(self) -> None:
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]


@pytest.fixture
async def events(raw: aioredis.Redis, redis_prefix: str) -> AsyncIterator[Events]:
    watcher = Events(raw, redis_prefix)
    await watcher.start()
    yield watcher
    await watcher.close()


async def command_of(api: Api, token: str, request_id: str) -> dict[str, Any]:
    async with asyncio.timeout(15):
        while True:
            _s, _h, page = await api.call("GET", f"/commands?requestId={request_id}", token=token)
            if page["items"]:
                return dict(page["items"][0])
            await asyncio.sleep(0.05)


async def test_a_low_risk_command_on_the_inbox_is_approved_without_anyone(
    api: Api, raw: aioredis.Redis
) -> None:
    _a, agent = await api.user("agent-low", "agent")
    await raw.xadd(api.r.daemon.settings.inbox, {"envelope": requested("low-1")})
    command = await command_of(api, agent, "low-1")
    assert (command["status"], command["riskCategory"], command["approvalId"]) == (
        "approved",
        "LOW",
        None,
    )


async def test_the_whole_loop_a_risky_command_waits_a_person_approves_the_agent_completes(
    api: Api, raw: aioredis.Redis, events: Events
) -> None:
    _a, agent = await api.user("agent-1", "agent")
    approver_id, approver = await api.user("alice", "approver")
    inbox = api.r.daemon.settings.inbox
    await raw.xadd(
        inbox,
        {"envelope": requested("loop-1", action="delete_file", parameters={"path": "/tmp/x"})},
    )
    command = await command_of(api, agent, "loop-1")
    assert (command["status"], command["riskCategory"]) == ("awaiting_approval", "HIGH")
    approval_id = command["approvalId"]
    await events.wait_for("approvals", "approval.requested", approvalId=approval_id)
    _s, _h, pending = await api.call("GET", "/approvals?status=pending", token=approver)
    assert [a["id"] for a in pending["items"]] == [approval_id]

    # The agent waits on the long-poll; the person decides meanwhile.
    poll = asyncio.create_task(api.call("GET", f"/approvals/{approval_id}?wait=30", token=agent))
    await asyncio.sleep(0.3)
    assert not poll.done()
    decided_at = time.monotonic()
    status_code, _h, approved = await api.call(
        "PUT", f"/approvals/{approval_id}/approve", token=approver
    )
    assert (status_code, approved["status"], approved["decidedBy"]) == (
        200,
        "approved",
        approver_id,
    )
    polled = await asyncio.wait_for(poll, 5)
    assert (polled[0], polled[2]["status"]) == (200, "approved")
    assert time.monotonic() - decided_at < 2
    decided = await events.wait_for("approvals", "approval.decided", approvalId=approval_id)
    assert decided["data"]["decision"] == "approved"
    assert decided["data"]["decidedBy"] == approver_id
    assert decided["data"]["requestId"] == "loop-1"
    assert decided["source"] == "jarvisd"
    moved = await events.wait_for("commands", "command.approved", requestId="loop-1")
    assert moved["data"]["status"] == "approved"

    # The agent runs it and reports.
    await raw.xadd(inbox, {"envelope": status("command.started", "loop-1")})
    await raw.xadd(
        inbox,
        {"envelope": status("command.completed", "loop-1", result={"deleted": 1}, durationMs=1234)},
    )
    async with asyncio.timeout(15):
        while True:
            _s, _h, final = await api.call("GET", f"/commands/{command['id']}", token=agent)
            if final["status"] == "succeeded":
                break
            await asyncio.sleep(0.05)
    assert (final["durationMs"], final["result"]) == (1234, {"deleted": 1})
    # Asking again after the decision answers at once, with the same state.
    again = await api.call("GET", f"/approvals/{approval_id}?wait=30", token=agent)
    assert (again[0], again[2]["status"]) == (200, "approved")


async def test_a_rejection_needs_a_reason_and_tells_the_agent_why(api: Api, events: Events) -> None:
    _r, requester = await api.user("rob")
    _p, approver = await api.user("pia", "approver")
    _, _, cmd = await api.call(
        "POST",
        "/commands",
        token=requester,
        json={"action": "transfer_money", "requestId": "rej-1", "parameters": {"eur": 500}},
    )
    aid = cmd["approvalId"]
    for body in (None, {}, {"reason": ""}):
        code, _h, problem = await api.call(
            "PUT", f"/approvals/{aid}/reject", token=approver, json=body
        )
        assert code == 400, problem
    _s, _h, still = await api.call("GET", f"/approvals/{aid}", token=requester)
    assert still["status"] == "pending"  # a refused decision changed nothing
    code, _h, rejected = await api.call(
        "PUT", f"/approvals/{aid}/reject", token=approver, json={"reason": "not this month"}
    )
    assert (code, rejected["status"], rejected["reason"]) == (200, "rejected", "not this month")
    event = await events.wait_for("approvals", "approval.decided", approvalId=aid)
    assert (event["data"]["decision"], event["data"]["reason"]) == ("rejected", "not this month")
    await events.wait_for("commands", "command.rejected", commandId=cmd["id"], status="rejected")
    _s, _h, command = await api.call("GET", f"/commands/{cmd['id']}", token=requester)
    assert command["status"] == "rejected"
    # An approval with a note is fine; a second decision is 409 with the state.
    _, _, other = await api.call(
        "POST", "/approvals", token=requester, json={"action": "x", "riskScore": 75}
    )
    code, _h, ok = await api.call(
        "PUT", f"/approvals/{other['id']}/approve", token=approver, json={"reason": "fine"}
    )
    assert (code, ok["reason"]) == (200, "fine")
    code, _h, conflict = await api.call("PUT", f"/approvals/{other['id']}/approve", token=approver)
    assert code == 409
    assert conflict["current"]["status"] == "approved"


async def test_nobody_approves_their_own_request_even_as_approver_or_for_someone_else(
    api: Api,
) -> None:
    user_id, _user = await api.user("uma")
    _a, approver = await api.user("abe", "approver")
    _b, other_approver = await api.user("bea", "approver")
    _, _, own = await api.call("POST", "/commands", token=approver, json={"action": "delete_file"})
    code, _h, problem = await api.call(
        "PUT", f"/approvals/{own['approvalId']}/approve", token=approver
    )
    assert code == 403
    assert "asked for or created" in problem["detail"]
    _, _, for_uma = await api.call(
        "POST", "/commands", token=approver, json={"action": "delete_file", "userId": user_id}
    )
    url = f"/approvals/{for_uma['approvalId']}"
    assert (await api.call("PUT", url + "/approve", token=approver))[0] == 403
    assert (await api.call("PUT", url + "/reject", token=approver, json={"reason": "x"}))[0] == 403
    assert (await api.call("PUT", url + "/approve", token=other_approver))[0] == 200


async def test_a_critical_command_needs_an_admin(api: Api) -> None:
    _r, requester = await api.user("cat")
    _a, approver = await api.user("dan", "approver")
    _m, admin = await api.user("eve", "admin")
    _, _, cmd = await api.call("POST", "/commands", token=requester, json={"action": "shell_exec"})
    assert (cmd["riskScore"], cmd["riskCategory"]) == (95, "CRITICAL")
    url = f"/approvals/{cmd['approvalId']}"
    code, _h, problem = await api.call("PUT", url + "/approve", token=approver)
    assert code == 403
    assert "CRITICAL" in problem["detail"]
    assert (await api.call("GET", url, token=requester))[2]["status"] == "pending"
    assert (await api.call("PUT", url + "/approve", token=admin))[0] == 200


async def test_two_approvers_approving_at_once_one_wins_the_other_gets_409(api: Api) -> None:
    _r, requester = await api.user("fay")
    _a, first = await api.user("gus", "approver")
    _b, second = await api.user("hal", "approver")
    for _ in range(5):
        _, _, cmd = await api.call(
            "POST", "/commands", token=requester, json={"action": "pay_rent"}
        )
        url = f"/approvals/{cmd['approvalId']}/approve"
        results = await asyncio.gather(
            api.call("PUT", url, token=first), api.call("PUT", url, token=second)
        )
        assert sorted(r[0] for r in results) == [200, 409]


@pytest.mark.parametrize("approval_overrides", [{"expiry": 2, "warn_before": 60}])
async def test_an_unanswered_request_is_warned_then_expired_as_a_rejection(
    api: Api, events: Events
) -> None:
    _r, requester = await api.user("ian")
    _p, approver = await api.user("jo", "approver")
    _, _, cmd = await api.call(
        "POST", "/commands", token=requester, json={"action": "delete_file", "requestId": "exp-1"}
    )
    aid = cmd["approvalId"]
    started = time.monotonic()
    poll = asyncio.create_task(api.call("GET", f"/approvals/{aid}?wait=20", token=requester))
    warning = await events.wait_for(
        "approvals", "approval.warning", approvalId=aid, requestId="exp-1"
    )
    _s, _h, pending = await api.call("GET", f"/approvals/{aid}", token=requester)
    assert pending["status"] == "pending"  # warned before, not at, the deadline
    assert warning["data"]["expiresAt"][:19] == pending["expiresAt"][:19]
    code, _h, expired = await asyncio.wait_for(poll, 10)
    assert (code, expired["status"], expired["decider"]) == (200, "expired", "jarvisd")
    assert 1.5 < time.monotonic() - started < 6
    event = await events.wait_for("approvals", "approval.expired", approvalId=aid)
    assert (event["data"]["decision"], event["data"]["requestId"]) == ("expired", "exp-1")
    await events.wait_for("commands", "command.rejected", commandId=cmd["id"], status="expired")
    _s, _h, command = await api.call("GET", f"/commands/{cmd['id']}", token=requester)
    assert command["status"] == "expired"
    code, _h, late = await api.call("PUT", f"/approvals/{aid}/approve", token=approver)
    assert (code, late["current"]["status"]) == (409, "expired")
    warnings = [e for ch, e in events.seen if e["type"] == "approval.warning"]
    assert len(warnings) == 1  # once per request


async def test_the_long_poll_is_bounded_private_and_answers_pending_after_its_time(
    api: Api,
) -> None:
    _a, alice = await api.user("kay")
    _b, bob = await api.user("lou")
    _, _, cmd = await api.call("POST", "/commands", token=alice, json={"action": "delete_file"})
    url = f"/approvals/{cmd['approvalId']}"
    for bad in ("56", "-1", "abc", "1.5", "99999999999999999999"):
        code, _h, problem = await api.call("GET", f"{url}?wait={bad}", token=alice)
        assert code == 400, (bad, problem)
    assert (await api.call("GET", f"{url}?wait=1", token=bob))[0] == 404  # not theirs
    assert (await api.call("GET", "/approvals/99999999?wait=1", token=alice))[0] == 404
    started = time.monotonic()
    code, _h, still = await api.call("GET", f"{url}?wait=1", token=alice)
    assert (code, still["status"]) == (200, "pending")
    assert 0.9 < time.monotonic() - started < 3


@pytest.mark.parametrize(
    "approval_overrides",
    # No sweep in the window watched: sweeps are asks of the persistence actor too.
    [{"max_waiters": 200, "max_waiters_per_principal": 1000, "sweep_interval": 3600}],
)
async def test_waiters_cost_no_database_polling_and_are_capped(api: Api) -> None:
    _u, user = await api.user("mo")
    _, _, cmd = await api.call("POST", "/commands", token=user, json={"action": "delete_file"})
    url = f"{api.base}/approvals/{cmd['approvalId']}?wait=20"
    headers = {"Authorization": f"Bearer {user}"}
    runtime = api.r.daemon.runtime
    persistence, approvals = (
        runtime.supervisor.get("persistence"),
        runtime.supervisor.get("approvals"),
    )

    async def wait_for_it(session: aiohttp.ClientSession) -> tuple[int, Any]:
        async with session.get(url, headers=headers) as resp:
            return resp.status, await resp.json()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as many:
        waiters = [asyncio.create_task(wait_for_it(many)) for _ in range(200)]
        async with asyncio.timeout(10):
            while approvals.snapshot()["approvals"]["waiting"] < 200:
                await asyncio.sleep(0.05)
            # Each waiter reads the request once after it starts watching.
            before = -1
            while persistence.snapshot()["processed"] != before:
                before = persistence.snapshot()["processed"]
                await asyncio.sleep(0.5)
        await asyncio.sleep(2)  # 200 waiters for 2 s: not one database read
        assert persistence.snapshot()["processed"] == before
        started = asyncio.get_running_loop().time()
        code, now = await wait_for_it(many)
        # Past approvals.max_waiters: the state now, at once, never a 503.
        assert (code, now["status"]) == (200, "pending")
        assert asyncio.get_running_loop().time() - started < 2
        cancel = await api.call("PUT", f"/approvals/{cmd['approvalId']}/cancel", token=user)
        assert cancel[0] == 200
        answers = await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert {(a[0], a[1]["status"]) for a in answers} == {(200, "cancelled")}
    assert approvals.snapshot()["approvals"]["waiting"] == 0


def _config_text(tmp_path: Path, servers: Servers, pg_dsn: str, prefix: str, policy: str) -> str:
    return f"""
[daemon]
state_dir = "{tmp_path / "state"}"
health_interval = 0.2
log_level = "warning"
[http]
port = 0
unix_socket = "{tmp_path / "jarvisd.sock"}"
[postgres]
dsn = "{pg_dsn}"
pool_max = 4
[redis]
url = "{servers.redis_url}"
prefix = "{prefix}"
{policy}
"""


async def test_the_risk_policy_is_validated_and_reloads_on_sighup(
    tmp_path: Path, servers: Servers, pg_dsn: str, redis_prefix: str
) -> None:
    cfg = tmp_path / "jarvisd.toml"
    plain = "[approvals]\ndefault_score = 10\n"
    deploys = plain + '[[approvals.rules]]\naction = "deploy*"\nscore = 90\n'
    broken = plain + '[[approvals.rules]]\naction = "deploy*"\nscore = 101\n'
    cfg.write_text(_config_text(tmp_path, servers, pg_dsn, redis_prefix, broken))
    checked = run_cli("check-config", "--config", str(cfg))
    assert checked.returncode == 2
    assert "approvals.rules[0].score" in checked.stderr
    cfg.write_text(_config_text(tmp_path, servers, pg_dsn, redis_prefix, plain))
    async for running in start_daemon(load_settings(cfg)):
        await running.wait_ready()
        api = Api(running, str(tmp_path / "jarvisd.sock"))
        try:
            _u, user = await api.user("rita")

            async def category(action: str, api: Api = api, user: str = user) -> str:
                _s, _h, cmd = await api.call(
                    "POST", "/commands", token=user, json={"action": action}
                )
                return str(cmd["riskCategory"])

            assert await category("deploy_app") == "LOW"
            cfg.write_text(_config_text(tmp_path, servers, pg_dsn, redis_prefix, deploys))
            plan = await running.daemon.reload()
            assert plan is not None
            assert "approvals.rules" in plan.applied
            assert await category("deploy_app") == "CRITICAL"
            assert await category("Deploy_Site") == "CRITICAL"  # globs ignore case
            cfg.write_text(_config_text(tmp_path, servers, pg_dsn, redis_prefix, broken))
            assert await running.daemon.reload() is None  # refused: the policy stays
            assert await category("deploy_db") == "CRITICAL"
        finally:
            await api.unix.close()
