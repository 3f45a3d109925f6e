"""What the person who decides is given, and how many must decide: the full
context of a request (parameters, the rule that scored it, who asked and
from where, its history), quorums of distinct approvers, escalation of
requests left unanswered, and the approval histograms in /metrics. On an
in-process daemon with real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from actors.data.model import CommandCreate, Rating
from actors.data.repo.common import init_connection
from actors.data.repo.ingest import Row, ingest_commands
from config import ApprovalSettings, ConfigError, Quorum, load_settings
from jarvisd.cli_show import detail, safe
from tests.test_api import Api
from tests.test_approvals import (  # noqa: F401 - the fixtures
    Events,
    api,
    approval_overrides,
    command_of,
    events,
)
from tests.test_bus import requested

QUORUM = {
    "quorum": {
        "HIGH": {"approvals": 2},
        "CRITICAL": {"approvals": 2, "admins": 1},
    }
}


async def test_a_request_carries_everything_a_person_decides_on(
    api: Api,  # noqa: F811
    raw: aioredis.Redis,
) -> None:
    agent_id, agent = await api.user("mailer", "agent")
    _p, approver = await api.user("petra", "approver")
    parameters = {"path": "/srv/reports/2026", "recursive": True, "note": "<b>x</b>"}
    await raw.xadd(
        api.r.daemon.settings.inbox,
        {
            "envelope": requested(
                "ctx-1",
                user_id=agent_id,
                action="delete_folder",
                parameters=parameters,
                description="clean last year's reports",
            )
        },
    )
    command = await command_of(api, agent, "ctx-1")
    code, _h, approval = await api.call(
        "GET", f"/approvals/{command['approvalId']}", token=approver
    )
    assert code == 200
    assert approval["parameters"] == parameters
    assert approval["description"] == "clean last year's reports"
    assert (approval["riskScore"], approval["scoreRule"]) == (80, 'rule "delete*"')
    assert approval["requester"] == "mailer"
    assert approval["sender"] == "inbox"
    assert (approval["approvalsRequired"], approval["adminsRequired"], approval["approvals"]) == (
        1,
        0,
        [],
    )
    # A standalone request keeps its own parameters; the sender's higher score says so.
    _u, user = await api.user("ursula")
    _, _, own = await api.call(
        "POST",
        "/approvals",
        token=user,
        json={"action": "open_door", "riskScore": 88, "parameters": {"door": "front"}},
    )
    assert (own["parameters"], own["scoreRule"], own["sender"]) == (
        {"door": "front"},
        "asked by the sender",
        "user:ursula",
    )
    # The history: the command's steps and the request's, oldest first.
    await api.call(
        "PUT",
        f"/approvals/{approval['id']}/reject",
        token=approver,
        json={"reason": "keep them"},
    )
    code, _h, history = await api.call(
        "GET", f"/approvals/{approval['id']}/history", token=approver
    )
    assert code == 200
    steps = [(s["subject"], s["from"], s["to"]) for s in history["items"]]
    # Oldest first; at one instant, the request's step before its command's.
    assert steps == [
        ("approval", None, "pending"),
        ("command", None, "awaiting_approval"),
        ("approval", "pending", "rejected"),
        ("command", "awaiting_approval", "rejected"),
    ]
    rejected = next(s for s in history["items"] if s["to"] == "rejected")
    assert (rejected["by"], rejected["reason"]) == ("petra", "keep them")
    # Another user's request's history is not found, as the request is not.
    code, _h, _p = await api.call("GET", f"/approvals/{approval['id']}/history", token=user)
    assert code == 404


@pytest.mark.parametrize("approval_overrides", [QUORUM])
async def test_a_quorum_needs_distinct_approvers_and_an_admin_where_the_rule_says(
    api: Api,  # noqa: F811
    events: Events,  # noqa: F811
) -> None:
    _r, requester = await api.user("rita")
    _a, ann = await api.user("ann", "approver")
    _b, ben = await api.user("ben", "approver")
    _m, max_ = await api.user("max", "admin")
    # HIGH: two approvals, anyone's who may decide.
    _, _, cmd = await api.call("POST", "/commands", token=requester, json={"action": "pay_rent"})
    url = f"/approvals/{cmd['approvalId']}"
    code, _h, first = await api.call("PUT", url + "/approve", token=ann, json={"reason": "ok"})
    assert code == 200
    assert first["status"] == "pending"
    assert [(v["by"], v["reason"]) for v in first["approvals"]] == [("ann", "ok")]
    vote = await events.wait_for("approvals", "approval.vote", approvalId=cmd["approvalId"])
    assert (vote["data"]["approvals"], vote["data"]["approvalsRequired"]) == (1, 2)
    # The same person twice is one approval: 409, and nothing changes.
    code, _h, again = await api.call("PUT", url + "/approve", token=ann)
    assert code == 409
    assert "already" in again["detail"]
    assert len(again["current"]["approvals"]) == 1
    _s, _h, command = await api.call("GET", f"/commands/{cmd['id']}", token=requester)
    assert command["status"] == "awaiting_approval"
    code, _h, done = await api.call("PUT", url + "/approve", token=ben)
    assert (code, done["status"], done["decider"]) == (200, "approved", "ben")
    assert [v["by"] for v in done["approvals"]] == ["ann", "ben"]
    await events.wait_for("commands", "command.approved", commandId=cmd["id"])

    # CRITICAL: two, one of them an admin; two approvers cannot make it.
    _, _, crit = await api.call("POST", "/commands", token=requester, json={"action": "sudo_ls"})
    url = f"/approvals/{crit['approvalId']}"
    assert (await api.call("PUT", url + "/approve", token=ann))[0] == 200
    code, _h, problem = await api.call("PUT", url + "/approve", token=ben)
    assert code == 403
    assert "admin" in problem["detail"]
    code, _h, done = await api.call("PUT", url + "/approve", token=max_)
    assert (code, done["status"]) == (200, "approved")
    assert [(v["by"], v["admin"]) for v in done["approvals"]] == [("ann", False), ("max", True)]

    # Where the quorum needs an admin, only an admin rejects.
    _, _, crit2 = await api.call("POST", "/commands", token=requester, json={"action": "sudo_y"})
    code, _h, problem = await api.call(
        "PUT", f"/approvals/{crit2['approvalId']}/reject", token=ben, json={"reason": "no"}
    )
    assert (code, "admin" in problem["detail"]) == (403, True)
    # One rejection ends a request, whatever approvals it had.
    _, _, other = await api.call("POST", "/commands", token=requester, json={"action": "pay_tax"})
    url = f"/approvals/{other['approvalId']}"
    assert (await api.call("PUT", url + "/approve", token=ann))[0] == 200
    code, _h, ended = await api.call("PUT", url + "/reject", token=ben, json={"reason": "no"})
    assert (code, ended["status"], len(ended["approvals"])) == (200, "rejected", 1)
    assert (await api.call("PUT", url + "/approve", token=max_))[0] == 409
    # The history keeps each approval as a step of its own.
    _s, _h, history = await api.call("GET", f"{url}/history", token=ann)
    steps = [(s["to"], s["by"]) for s in history["items"] if s["subject"] == "approval"]
    assert steps == [("pending", "rita"), ("pending", "ann"), ("rejected", "ben")]


@pytest.mark.parametrize("approval_overrides", [QUORUM])
async def test_racing_approvers_give_one_winner_per_step(api: Api) -> None:  # noqa: F811
    _r, requester = await api.user("rudi")
    tokens = [(await api.user(f"appr{i}", "approver"))[1] for i in range(3)]
    for n in range(4):
        _, _, cmd = await api.call(
            "POST", "/commands", token=requester, json={"action": f"pay_bill_{n}"}
        )
        url = f"/approvals/{cmd['approvalId']}/approve"
        results = await asyncio.gather(*(api.call("PUT", url, token=t) for t in tokens))
        codes = sorted(r[0] for r in results)
        # Two steps, two winners; the third finds the request decided.
        assert codes == [200, 200, 409], results
        _s, _h, final = await api.call("GET", f"/approvals/{cmd['approvalId']}", token=tokens[0])
        assert final["status"] == "approved"
        assert len(final["approvals"]) == 2
        assert len({v["by"] for v in final["approvals"]}) == 2


@pytest.mark.parametrize("approval_overrides", [{"escalate_after": 0.5, "expiry": 60}])
async def test_an_unanswered_request_is_escalated_once_and_shows_in_metrics(
    api: Api,  # noqa: F811
    events: Events,  # noqa: F811
) -> None:
    _r, requester = await api.user("esther")
    _a, approver = await api.user("ed", "approver")
    _, _, cmd = await api.call(
        "POST", "/commands", token=requester, json={"action": "transfer_funds"}
    )
    aid = cmd["approvalId"]
    escalated = await events.wait_for("approvals", "approval.escalated", approvalId=aid)
    assert escalated["data"]["action"] == "transfer_funds"
    assert escalated["data"]["requester"] == "esther"
    _s, _h, approval = await api.call("GET", f"/approvals/{aid}", token=approver)
    assert approval["escalatedAt"] is not None
    await asyncio.sleep(1.0)  # more sweeps: still escalated once
    count = sum(
        1
        for ch, e in events.seen
        if e["type"] == "approval.escalated" and e["data"]["approvalId"] == aid
    )
    assert count == 1

    async def metrics() -> str:
        async with api.r.session.get(api.base + "/metrics") as resp:
            return await resp.text()

    async with asyncio.timeout(10):
        while 'jarvisd_approval_pending_age_seconds_bucket{le="+Inf"} 1' not in (
            text := await metrics()
        ):
            await asyncio.sleep(0.2)
    assert 'jarvisd_approval_pending_age_seconds_bucket{le="1"} 0' in text
    await api.call("PUT", f"/approvals/{aid}/approve", token=approver)
    text = await metrics()
    assert 'jarvisd_approval_decision_seconds_count{outcome="approved"} 1' in text
    sample = next(
        line
        for line in text.splitlines()
        if line.startswith('jarvisd_approval_decision_seconds_bucket{outcome="approved",le="1"}')
    )
    assert sample.endswith(" 0")  # it waited more than a second


@pytest.mark.parametrize(
    ("quorum", "said"),
    [
        ("HIGH = {approvals = 1, admins = 2}", "admins <= approvals"),
        ("HIGH = {approvals = 0}", "approvals.quorum[...].approvals: must be at least 1"),
        ("SEVERE = {approvals = 2}", "SEVERE"),
    ],
)
def test_a_quorum_that_cannot_be_met_is_refused_in_words(
    tmp_path: Path, quorum: str, said: str
) -> None:
    path = tmp_path / "j.toml"
    path.write_text(f"[approvals.quorum]\n{quorum}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert said in str(err.value)


def test_the_terminal_gets_no_escape_an_agent_wrote() -> None:
    hostile = "rm\x1b[2J\x1b]0;pwned\x07\u202eexe.txt\nforged line\r\u200b"
    shown = safe(hostile)
    assert shown.isprintable()
    assert "\\u001b[2J" in shown
    assert "\\u202e" in shown
    assert "\\u000a" in shown
    assert safe("plain text, ünïcode ✓") == "plain text, ünïcode ✓"


@pytest.mark.parametrize("approval_overrides", [QUORUM])
async def test_racing_approvals_of_a_standalone_request_count_each_person_once(
    api: Api,  # noqa: F811
) -> None:
    _r, requester = await api.user("stan")
    tokens = [(await api.user(f"racer{i}", "approver"))[1] for i in range(3)]
    for n in range(4):
        _, _, made = await api.call(
            "POST", "/approvals", token=requester, json={"action": f"move_{n}", "riskScore": 80}
        )
        url = f"/approvals/{made['id']}/approve"
        # Each approver several times at once: two places, three people.
        results = await asyncio.gather(
            *(api.call("PUT", url, token=t) for t in tokens for _ in range(4))
        )
        assert sorted({r[0] for r in results}) == [200, 409], results
        assert [r[0] for r in results].count(200) == 2
        _s, _h, final = await api.call("GET", f"/approvals/{made['id']}", token=tokens[0])
        assert final["status"] == "approved"
        assert len(final["approvals"]) == 2
        assert final["decider"] == final["approvals"][1]["by"]


@pytest.mark.parametrize("approval_overrides", [{"quorum": {"HIGH": {"approvals": 2}}}])
async def test_the_local_admin_and_deleted_users_do_not_make_up_a_quorum(
    api: Api,  # noqa: F811
) -> None:
    _r, requester = await api.user("rhea")
    _, _, cmd = await api.call("POST", "/commands", token=requester, json={"action": "pay_x"})
    url = f"/approvals/{cmd['approvalId']}"
    # The host's local admin is nobody in particular: no place in a quorum.
    code, _h, problem = await api.call("PUT", url + "/approve", local=True)
    assert code == 403
    assert "--token" in problem["detail"]
    # A user's approval goes with the user; the name made again is someone else.
    gone_id, gone = await api.user("gone", "approver")
    assert (await api.call("PUT", url + "/approve", token=gone))[0] == 200
    assert (await api.call("DELETE", f"/users/{gone_id}", local=True))[0] == 204
    _s, _h, now = await api.call("GET", url, token=requester)
    assert (now["status"], now["approvals"]) == ("pending", [])
    _n, again = await api.user("gone", "approver")
    code, _h, one = await api.call("PUT", url + "/approve", token=again)
    assert (code, one["status"], len(one["approvals"])) == (200, "pending", 1)
    # An approval counts while its giver may decide: made a user, it no longer fills a place.
    demoted_id, demoted = await api.user("demoted", "approver")
    _, _, other = await api.call("POST", "/commands", token=requester, json={"action": "pay_y"})
    other_url = f"/approvals/{other['approvalId']}"
    assert (await api.call("PUT", other_url + "/approve", token=demoted))[0] == 200
    code, _h, _u = await api.call("PUT", f"/users/{demoted_id}", local=True, json={"role": "user"})
    assert code == 200
    _s, _h, now = await api.call("GET", other_url, token=requester)
    assert now["approvals"] == []
    code, _h, still = await api.call("PUT", other_url + "/approve", token=again)
    assert (code, still["status"]) == (200, "pending")  # one of two, not two
    # CRITICAL keeps its admin when only HIGH is configured.
    _a, ann = await api.user("ann2", "approver")
    _, _, crit = await api.call("POST", "/commands", token=requester, json={"action": "sudo_x"})
    code, _h, problem = await api.call("PUT", f"/approvals/{crit['approvalId']}/approve", token=ann)
    assert (code, "admin" in problem["detail"]) == (403, True)


def test_the_terminal_gets_no_line_an_agent_made() -> None:
    approval = {
        "id": 3,
        "status": "pending",
        "riskCategory": "HIGH",
        "riskScore": 80,
        "action": "deploy",
        "parameters": {"target": "db\u2029\u2029  decided      approved by adm\u0085\u2028  note"},
    }
    text = detail(approval, None, [], datetime.now(UTC))
    assert not any(line.startswith("  decided") for line in text.split("\n"))
    assert "\\u2029" in text
    assert all(line.isprintable() for line in text.split("\n"))


async def test_a_batch_takes_the_quorum_from_the_row_it_inserts(pg_dsn: str) -> None:
    """Two rows of one batch with one requestId: the first names a user that
    does not exist and is passed over; the command, its score's rule and its
    quorum all come from the row inserted, never from the other one."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await init_connection(conn)
        user = await conn.fetchval(
            "INSERT INTO users (username, role) VALUES ('batcher', 'user') RETURNING id"
        )
        rows: list[Row] = [
            (CommandCreate(action="read_x", request_id="r"), 99_999_999, None, "agent:a"),
            (CommandCreate(action="shell_exec", request_id="r"), user, None, "agent:a"),
        ]
        low, critical = Rating(10, "default score"), Rating(95, 'rule "shell*"', 2, 1)
        out = await ingest_commands(conn, rows, threshold=70, expiry=60, ratings=[low, critical])
        assert [o.outcome for o in out] == ["no_user", "created"]
        command = await conn.fetchrow("SELECT action, risk_category FROM commands")
        assert tuple(command) == ("shell_exec", "CRITICAL")
        approval = await conn.fetchrow(
            "SELECT score_rule, approvals_required, admins_required FROM approval_requests"
        )
        assert tuple(approval) == ('rule "shell*"', 2, 1)
    finally:
        await conn.close()


def test_a_quorum_keeps_the_defaults_admin_unless_it_says_otherwise() -> None:
    both = {"CRITICAL": {"approvals": 2}, "HIGH": {"approvals": 2}}
    policy = msgspec.convert({"quorum": both}, ApprovalSettings)
    assert policy.quorum_of("CRITICAL") == Quorum(approvals=2, admins=1)
    assert policy.quorum_of("HIGH") == Quorum(approvals=2, admins=0)
    none = msgspec.convert(
        {"quorum": {"CRITICAL": {"approvals": 1, "admins": 0}}}, ApprovalSettings
    )
    assert none.quorum_of("CRITICAL").admins == 0  # said in so many words
    assert ApprovalSettings().quorum_of("CRITICAL") == Quorum(approvals=1, admins=1)
    assert ApprovalSettings().quorum_of("LOW") == Quorum(approvals=1, admins=0)
