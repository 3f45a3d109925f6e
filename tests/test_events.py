"""Events are built in one module from typed structs (``actors.events``): an
event of a type has the same fields whichever path made the change, and
README's event table is the one those structs make."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from actors import events
from tests.test_agents import agents, api, bus_overrides, envelope  # noqa: F401 - fixtures
from tests.test_api import Api
from tests.test_approvals import Events

EVENTS_DOC = Path(__file__).parent.parent / "docs" / "agents.md"


@pytest.fixture
async def watcher(raw: aioredis.Redis, redis_prefix: str) -> AsyncIterator[Events]:
    seen = Events(raw, redis_prefix)
    await seen.start()
    yield seen
    await seen.close()


def fields_of(kind: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(kind)}


def test_the_documented_event_table_is_the_one_the_event_structs_make() -> None:
    text = EVENTS_DOC.read_text()
    start, end = "<!-- events-table -->\n", "<!-- /events-table -->"
    assert start in text, "docs/agents.md marks its event table"
    table = text[text.index(start) + len(start) : text.index(end)]
    assert table == events.table(), "run `python -m actors.events` and paste its table"


def test_every_event_type_has_a_kind_a_type_and_a_meaning() -> None:
    types = [kind.TYPE for kind in events.EVENT_TYPES]
    assert len(types) == len(set(types))
    for kind in events.EVENT_TYPES:
        assert kind.KIND in ("commands", "approvals")
        assert kind.__doc__, kind.TYPE


async def test_an_approval_requested_through_an_agents_inbox_has_its_deadline_and_every_field(
    api: Api,  # noqa: F811
    agents: Any,  # noqa: F811
    watcher: Events,
) -> None:
    agent = await agents("ev-agent")
    client = agent.client()
    await client.xadd(agent.inbox, {"envelope": envelope("ev-1", action="delete_file")})
    requested = await watcher.wait_for("approvals", "approval.requested", requestId="ev-1")
    assert set(requested["data"]) == fields_of(events.ApprovalRequested)
    assert requested["data"]["expiresAt"] is not None
    created = await watcher.wait_for("commands", "command.created", requestId="ev-1")
    assert set(created["data"]) == fields_of(events.CommandCreated)
    assert created["data"]["sender"] == "agent:ev-agent"


@pytest.mark.parametrize("verb", ["approve", "reject"])
async def test_a_decision_by_the_local_admin_says_who_decided_and_why(
    api: Api,  # noqa: F811
    watcher: Events,
    verb: str,
) -> None:
    _uid, user = await api.user("ev-user")
    _s, _h, cmd = await api.call("POST", "/commands", token=user, json={"action": "delete_file"})
    body = {"reason": "not today"} if verb == "reject" else None
    status, _h, decided = await api.call(
        "PUT", f"/approvals/{cmd['approvalId']}/{verb}", local=True, json=body
    )
    assert status == 200, decided
    event = await watcher.wait_for("approvals", "approval.decided", approvalId=cmd["approvalId"])
    data = event["data"]
    assert set(data) == fields_of(events.ApprovalDecided)
    # The local admin has no user id: decidedBy is there, and null.
    assert data["decidedBy"] is None
    assert data["decider"] == f"uid:{os.geteuid()}"
    assert data["reason"] == (None if verb == "approve" else "not today")
    assert data["decision"] == ("approved" if verb == "approve" else "rejected")
    moved = await watcher.wait_for(
        "commands", f"command.{decided['status']}", approvalId=cmd["approvalId"]
    )
    assert set(moved["data"]) == fields_of(events.CommandApproved)
