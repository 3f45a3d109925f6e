"""Smaller holes found by attacking the daemon from outside, each closed: a
brute force that races the throttle, risky actions spelled to look harmless,
parameters that could never be approved, statistics told to anyone, a client
that leaves mid-operation."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.test_api import Api
from tests.test_security import api, config_overrides, log_lines, login

__all__ = ["api", "config_overrides", "log_lines"]  # fixtures shared with the security tests


@pytest.mark.parametrize("config_overrides", [{"auth": {"login_failures_per_user": 10}}])
async def test_three_hundred_wrong_passwords_at_once_get_ten_checks_and_the_right_one_waits(
    api: Api,
) -> None:
    await api.user("brute-target", password="the right password")

    async def attempt(password: str) -> int:
        status, _h, _b = await api.call(
            "POST", "/auth/login", json={"username": "brute-target", "password": password}
        )
        return status

    answers = await asyncio.gather(*(attempt(f"guess number {i}") for i in range(300)))
    assert answers.count(401) == 10, sorted(set(answers))
    assert answers.count(429) == 290
    assert await attempt("the right password") == 429


async def test_a_right_password_does_not_count_against_the_user(api: Api) -> None:
    await api.user("often-in", password="often password")
    for _ in range(15):  # more than auth.login_failures_per_user logins, all right
        await login(api, "often-in", "often password")


@pytest.mark.parametrize(
    ("action", "stored"),
    [
        (" shell_exec", "shell_exec"),
        ("SHELL_EXEC\t", "shell_exec"),
        ("Delete_File", "delete_file"),
    ],
)
async def test_actions_are_trimmed_and_case_folded_before_they_are_scored(
    api: Api, action: str, stored: str
) -> None:
    _uid, agent = await api.user("spelling-agent", "agent")
    status, _h, command = await api.call("POST", "/commands", token=agent, json={"action": action})
    assert status == 201, command
    assert command["action"] == stored
    assert command["riskCategory"] in ("HIGH", "CRITICAL")
    assert command["status"] == "awaiting_approval"


@pytest.mark.parametrize(
    "action",
    [
        "shell\u200b_exec",  # a zero-width space
        "sh\u0435ll_exec",  # a Cyrillic e
        "rm\t-rf /",
        "rm -rf /",
        "\uff53\uff48\uff45\uff4c\uff4c",  # fullwidth letters
        "",
        "   ",
    ],
)
async def test_actions_outside_identifier_characters_are_refused(api: Api, action: str) -> None:
    _uid, agent = await api.user("spelling-agent", "agent")
    status, _h, problem = await api.call("POST", "/commands", token=agent, json={"action": action})
    assert status == 400, problem
    assert "action" in problem["detail"]
    _s, _h, page = await api.call("GET", "/commands", token=agent)
    assert page["items"] == []


@pytest.mark.parametrize(
    "parameters", [{"amount": 1e300}, {"amount": -0.0}, {"n": 12345678901234567890123}]
)
async def test_parameters_postgresql_rewrites_can_still_be_approved(
    api: Api, parameters: dict[str, Any]
) -> None:
    _a, agent = await api.user("numbers-agent", "agent")
    _b, approver = await api.user("numbers-approver", "approver")
    status, _h, command = await api.call(
        "POST",
        "/commands",
        token=agent,
        json={"action": "transfer_funds", "parameters": parameters, "requestId": "num-1"},
    )
    assert status == 201, command
    status, _h, again = await api.call(
        "POST",
        "/commands",
        token=agent,
        json={"action": "transfer_funds", "parameters": parameters, "requestId": "num-1"},
    )
    assert status == 200, again  # the same command again: not a conflict
    status, _h, decided = await api.call(
        "PUT", f"/approvals/{command['approvalId']}/approve", token=approver
    )
    assert status == 200, decided
    _s, _h, now = await api.call("GET", f"/commands/{command['id']}", token=agent)
    assert now["status"] == "approved"


async def test_cache_namespace_statistics_are_not_on_the_public_routes(api: Api) -> None:
    _a, agent = await api.user("stats-agent", "agent")
    status, _h, _b = await api.call(
        "POST",
        "/cache/set",
        token=agent,
        json={"namespace": "secret-project", "key": "k", "value": 1},
    )
    assert status == 200
    for path in ("/stats", "/redis/stats", "/metrics"):
        async with api.r.session.get(api.base + path) as resp:
            text = await resp.text()
        assert resp.status == 200, path
        assert "secret-project" not in text, path
    _s, _h, _b = await api.call("GET", "/cache/stats", token=agent)
    assert "secret-project" in json.dumps(_b)


async def test_a_websocket_client_that_leaves_mid_operation_is_no_server_error(
    api: Api, log_lines: Any
) -> None:
    _a, agent = await api.user("leaving-agent", "agent")
    for _ in range(20):
        ws = await api.r.session.ws_connect(
            api.base + "/ws", headers={"Authorization": f"Bearer {agent}"}
        )
        await ws.send_str(json.dumps({"op": "subscribe", "channels": ["user_activity"]}))
        await ws.send_str(json.dumps({"op": "ping"}))
        # Gone without a close frame, while the daemon is answering.
        transport = ws._response.connection.transport if ws._response.connection else None
        if transport is not None:
            transport.abort()
        await ws.close()
    await asyncio.sleep(0.3)
    _s, _h, _b = await api.call("GET", "/stats", local=True)
    text = log_lines.getvalue()
    assert "Traceback" not in text
    assert "http_handler_failed" not in text
    async with api.r.session.get(api.base + "/metrics") as resp:
        metrics = await resp.text()
    assert 'status="500"' not in metrics


async def test_an_agent_reports_only_on_the_commands_it_sent(api: Api) -> None:
    _a, agent = await api.user("reporting-agent", "agent")
    _b, other_agent = await api.user("other-agent", "agent")
    uid, user = await api.user("commander")
    _s, _h, theirs = await api.call(
        "POST", "/commands", token=user, json={"action": "transfer_funds"}
    )
    _s, _h, others = await api.call("POST", "/commands", token=other_agent, json={"action": "x"})
    _s, _h, mine = await api.call(
        "POST", "/commands", token=agent, json={"action": "x", "userId": uid}
    )
    for cmd in (theirs, others):
        for status in ("running", "cancelled"):
            code, _h, problem = await api.call(
                "PUT", f"/commands/{cmd['id']}", token=agent, json={"status": status}
            )
            assert code == 403, problem
            assert "commands it sent" in problem["detail"]
    _s, _h, approval = await api.call("GET", f"/approvals/{theirs['approvalId']}", local=True)
    assert approval["status"] == "pending"
    code, _h, running = await api.call(
        "PUT", f"/commands/{mine['id']}", token=agent, json={"status": "running"}
    )
    assert (code, running["status"]) == (200, "running")
    assert (await api.call("PUT", "/commands/999999", token=agent, json={"status": "running"}))[
        0
    ] == 404


@pytest.mark.parametrize(
    ("action", "score"),
    [("rm-rf", 90), ("rm.rf", 90), ("agent:shell_exec", 95), ("files.delete", 80)],
)
async def test_no_prefix_or_separator_hides_a_risky_verb_from_the_policy(
    api: Api, action: str, score: int
) -> None:
    _uid, agent = await api.user("parts-agent", "agent")
    status, _h, command = await api.call("POST", "/commands", token=agent, json={"action": action})
    assert status == 201, command
    assert (command["riskScore"], command["status"]) == (score, "awaiting_approval")


async def test_nul_in_what_postgresql_stores_is_refused_with_where_it_is(api: Api) -> None:
    _uid, agent = await api.user("nul-agent", "agent")
    status, _h, problem = await api.call(
        "POST", "/commands", token=agent, json={"action": "x", "parameters": {"a": ["b\u0000"]}}
    )
    assert status == 400
    assert "NUL" in problem["detail"]
    assert "$.parameters.a[0]" in problem["detail"]
    # Redis holds it well: a cache value may carry one.
    status, _h, _b = await api.call(
        "POST", "/cache/set", token=agent, json={"key": "k", "value": "b\u0000"}
    )
    assert status == 200
    assert (await api.call("DELETE", "/agents/a%00b", local=True))[0] == 404


async def test_a_request_id_twice_in_one_batch_makes_one_command_with_its_own_request(
    api: Api,
) -> None:
    """The first row is the command; a second row with the same requestId and
    a harmless action can neither become its approval request nor add one."""
    from actors import persistence as m
    from actors.data.model import CommandCreate

    uid, _t = await api.user("batch-agent", "agent")
    rows = (
        (
            CommandCreate(action="shell_exec", request_id="x", parameters={"p": 1}),
            None,
            uid,
            "agent:batch-agent",
        ),
        (
            CommandCreate(
                action="open_app", request_id="x", description="Open mail", parameters={"p": 1}
            ),
            None,
            uid,
            "agent:batch-agent",
        ),
    )
    persistence = api.r.daemon.supervisor.get("persistence")
    done = await persistence.ask(m.IngestCommands(rows=rows), timeout=10)
    assert [d.outcome for d in done] == ["created", "conflict"]
    _s, _h, listed = await api.call("GET", "/approvals?status=pending", local=True)
    (request,) = listed["items"]
    assert (request["action"], request["riskCategory"]) == ("shell_exec", "CRITICAL")
    assert request["commandId"] == done[0].command_id
