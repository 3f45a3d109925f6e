"""The agent bus end to end on an in-process daemon, real Redis and PostgreSQL:
exactly once into PostgreSQL, dead letters with reasons, bounded retries,
status reports, cache invalidation, the PUBLISH path, events out."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from config import LoadedConfig
from tests.servers import (
    SINGLE_AND_CLUSTER,
    Servers,
    listen,
    redis_url_for,
    stream_drained,
    subscribers,
)
from tests.test_http import Running, start_daemon

# The bus's own mechanics are shown on the shared inbox (trusted writers);
# agents on inboxes of their own: tests/test_agents.py.
BUS = {
    "claim_interval": 0.2,
    "claim_idle": 0.3,
    "block_ms": 100,
    "trim_interval": 0.5,
    "shared_inbox": True,
}


@pytest.fixture(params=SINGLE_AND_CLUSTER)
def redis_url(request: pytest.FixtureRequest) -> str:
    """Every test here runs on one server and again on a Redis Cluster."""
    return redis_url_for(request)


@pytest.fixture
def bus_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def daemon(
    make_config: Callable[..., LoadedConfig], bus_overrides: dict[str, Any]
) -> AsyncIterator[Running]:
    async for running in start_daemon(make_config(bus={**BUS, **bus_overrides})):
        await running.wait_ready()
        yield running


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()


def stream_of(running: Running) -> str:
    return running.daemon.settings.inbox


def requested(request_id: str, *, user_id: int | None = None, **data: Any) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "id": request_id,
            "type": "command.requested",
            "source": "test-agent",
            "userId": user_id,
            "data": {"action": "open_app", "parameters": {"app": "mail"}, **data},
        }
    ).encode()


def status(kind: str, request_id: str, **data: Any) -> bytes:
    return json.dumps(
        {"v": 1, "id": str(uuid.uuid4()), "type": kind, "data": {"requestId": request_id, **data}}
    ).encode()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def dead_letters(raw: aioredis.Redis, running: Running) -> list[dict[str, str]]:
    entries = await raw.xrange(f"{stream_of(running)}:dead")
    return [{k.decode(): v.decode(errors="replace") for k, v in f.items()} for _i, f in entries]


async def drained(raw: aioredis.Redis, running: Running) -> bool:
    return await stream_drained(raw, stream_of(running))


async def test_ten_thousand_envelopes_with_repeated_ids_give_exactly_the_distinct_commands(
    daemon: Running, raw: aioredis.Redis, db: asyncpg.Connection
) -> None:
    stream = stream_of(daemon)
    ids = [f"bulk-{i}" for i in range(9000)] + [f"bulk-{i}" for i in range(0, 9000, 9)]
    async with raw.pipeline(transaction=False) as pipe:
        for rid in ids:  # a repeated id is a redelivery: the same envelope again
            score = 80 if int(rid.split("-")[1]) % 100 == 0 else 10
            pipe.xadd(stream, {"envelope": requested(rid, riskScore=score)})
        await pipe.execute()
    assert len(ids) == 10_000

    async def all_in() -> bool:
        return await db.fetchval("SELECT count(*) FROM commands") == 9000 and await drained(
            raw, daemon
        )

    await eventually(all_in, timeout=60)
    assert await db.fetchval("SELECT count(DISTINCT request_id) FROM commands") == 9000
    # The same approval decision as POST /commands: a request for each risky one.
    risky = await db.fetchval("SELECT count(*) FROM commands WHERE status = 'awaiting_approval'")
    assert risky == await db.fetchval("SELECT count(*) FROM approval_requests") == 90
    assert await db.fetchval("SELECT count(*) FROM command_events") == 9000
    assert await db.fetchval("SELECT count(*) FROM commands WHERE source <> 'test-agent'") == 0
    assert await raw.xlen(f"{stream}:dead") == 0
    # Trimmed: what the group finished does not stay in the stream.
    await eventually(lambda: _shorter_than(raw, stream, 1000), timeout=10)


async def test_one_trim_round_drops_everything_finished_however_much(
    make_config: Callable[..., LoadedConfig], raw: aioredis.Redis
) -> None:
    """40,000 entries the group has finished (it starts after them): the first
    trim round drops them all, not just the 10,000 one XTRIM ~ drops by default."""
    loaded = make_config(bus={**BUS, "trim_interval": 600})
    stream = loaded.settings.inbox
    for start in range(0, 40_000, 10_000):
        async with raw.pipeline(transaction=False) as pipe:
            for i in range(start, start + 10_000):
                pipe.xadd(stream, {"envelope": requested(f"old-{i}")})
            await pipe.execute()
    await raw.xgroup_create(stream, loaded.settings.bus.group, id="$")
    async for running in start_daemon(loaded):
        await running.wait_ready()
        await eventually(lambda: _shorter_than(raw, stream, 1000), timeout=10)
        assert running.daemon.supervisor.get("bus").snapshot()["bus"]["trimmed"] > 39_000


async def _shorter_than(raw: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await raw.xlen(stream)) < n


async def test_malformed_unknown_oversized_and_wrongly_typed_envelopes_are_dead_lettered(
    daemon: Running, raw: aioredis.Redis, db: asyncpg.Connection
) -> None:
    stream = stream_of(daemon)
    bad = {
        b"{not json": "malformed",
        json.dumps(
            {"v": 1, "id": "u1", "type": "user.exploded", "data": {}}
        ).encode(): "unknown type",
        requested("big", description="d" * 70_000): "oversized",
        requested("typed", riskScore="high"): "invalid",
        requested("no-user", user_id=424242): "no user 424242",
        status("command.started", "never-created"): "not found",
    }
    await raw.xadd(stream, {"something": "else"})
    for payload in bad:
        await raw.xadd(stream, {"envelope": payload})
    await raw.xadd(stream, {"envelope": requested("fine-1")})

    async def all_dead() -> bool:
        return len(await dead_letters(raw, daemon)) == len(bad) + 1

    await eventually(all_dead)
    letters = await dead_letters(raw, daemon)
    reasons = [d["reason"] for d in letters]
    for expected in [*bad.values(), "no envelope field"]:
        assert any(expected in r for r in reasons), (expected, reasons)
    assert all(d["path"] == "stream" and d["entry"] for d in letters)
    assert await db.fetchval("SELECT count(*) FROM commands") == 1
    status_code, _ctype, _b = await daemon.get("/health/ready")
    assert status_code == 200
    await eventually(lambda: drained(raw, daemon))


@pytest.mark.parametrize("bus_overrides", [{"max_deliveries": 3}])
async def test_an_envelope_that_keeps_failing_is_dead_lettered_after_max_deliveries_never_more(
    daemon: Running, raw: aioredis.Redis
) -> None:
    stream = stream_of(daemon)
    entry = await raw.xadd(stream, {"envelope": status("command.completed", "not-there")})

    async def dead() -> bool:
        return len(await dead_letters(raw, daemon)) == 1

    await eventually(dead)
    (letter,) = await dead_letters(raw, daemon)
    assert letter["deliveries"] == "3"
    assert "after 3 deliveries" in letter["reason"]
    assert letter["entry"] == entry.decode()
    await eventually(lambda: drained(raw, daemon))
    await asyncio.sleep(1.0)  # claim rounds go on: nothing is delivered again
    assert len(await dead_letters(raw, daemon)) == 1
    assert daemon.daemon.supervisor.get("bus").snapshot()["bus"]["retried"] == 2


async def test_status_reports_follow_a_command_and_record_duration_result_and_error(
    daemon: Running, raw: aioredis.Redis, db: asyncpg.Connection
) -> None:
    stream = stream_of(daemon)
    for payload in (
        requested("life-1"),
        status("command.started", "life-1"),
        status("command.completed", "life-1", result={"opened": True}, durationMs=1234),
        requested("life-2"),
        status("command.started", "life-2"),
        status("command.failed", "life-2", error="disk full", durationMs=5),
        requested("life-3", riskScore=85),
        status("command.cancelled", "life-3", reason="user changed their mind"),
        status("command.completed", "life-1", result={"opened": True}, durationMs=1234),
    ):
        await raw.xadd(stream, {"envelope": payload})

    async def settled() -> bool:
        return await db.fetchval(
            "SELECT count(*) FROM commands WHERE status IN ('succeeded', 'failed', 'cancelled')"
        ) == 3 and await drained(raw, daemon)

    await eventually(settled)
    rows = {
        r["request_id"]: r
        for r in await db.fetch(
            "SELECT request_id, status, result, error, duration_ms FROM commands"
        )
    }
    assert (rows["life-1"]["status"], rows["life-1"]["duration_ms"]) == ("succeeded", 1234)
    assert json.loads(rows["life-1"]["result"]) == {"opened": True}
    assert (rows["life-2"]["status"], rows["life-2"]["error"]) == ("failed", "disk full")
    assert rows["life-3"]["status"] == "cancelled"
    approval = await db.fetchrow("SELECT status FROM approval_requests")
    assert approval["status"] == "cancelled"
    assert await raw.xlen(f"{stream}:dead") == 0  # the repeated report was a no-op


async def test_an_agent_that_reports_only_the_outcome_of_an_approved_command_is_heard(
    daemon: Running, raw: aioredis.Redis, db: asyncpg.Connection
) -> None:
    """No command.started (most agents send none): completed and failed are
    taken from approved, the start recorded as implicit; a started that
    arrives after the outcome is a no-op, not a dead letter."""
    stream = stream_of(daemon)
    for payload in (
        requested("only-done"),
        status("command.completed", "only-done", result={"ok": True}, durationMs=300),
        requested("only-failed"),
        status("command.failed", "only-failed", error="no such app"),
        requested("late-start"),
        status("command.completed", "late-start", durationMs=7),
        status("command.started", "late-start"),
    ):
        await raw.xadd(stream, {"envelope": payload})

    async def settled() -> bool:
        return await db.fetchval(
            "SELECT count(*) FROM commands WHERE status IN ('succeeded', 'failed')"
        ) == 3 and await drained(raw, daemon)

    await eventually(settled)
    assert await dead_letters(raw, daemon) == []
    rows = {
        r["request_id"]: r
        for r in await db.fetch(
            "SELECT request_id, status, duration_ms, error, "
            "extract(epoch FROM finished_at - started_at) * 1000 AS ran FROM commands"
        )
    }
    assert (rows["only-done"]["status"], rows["only-done"]["duration_ms"]) == ("succeeded", 300)
    assert round(rows["only-done"]["ran"]) == 300  # started when it says it did
    assert (rows["only-failed"]["status"], rows["only-failed"]["error"]) == (
        "failed",
        "no such app",
    )
    assert rows["late-start"]["status"] == "succeeded"
    history = await db.fetch(
        "SELECT e.from_status, e.to_status, e.reason FROM command_events e "
        "JOIN commands c ON c.id = e.command_id WHERE c.request_id = 'only-done' ORDER BY e.id"
    )
    assert [(h["from_status"], h["to_status"]) for h in history][-2:] == [
        ("approved", "running"),
        ("running", "succeeded"),
    ]
    assert "implicitly" in history[-2]["reason"]


async def test_a_status_report_cannot_approve_a_waiting_command(
    daemon: Running, raw: aioredis.Redis, db: asyncpg.Connection
) -> None:
    stream = stream_of(daemon)
    await raw.xadd(stream, {"envelope": requested("risky-1", riskScore=95)})
    await raw.xadd(stream, {"envelope": status("command.started", "risky-1")})

    async def dead() -> bool:
        return len(await dead_letters(raw, daemon)) == 1

    await eventually(dead)
    (letter,) = await dead_letters(raw, daemon)
    assert "conflict" in letter["reason"]
    assert await db.fetchval("SELECT status FROM commands") == "awaiting_approval"


async def test_cache_invalidate_reaches_the_cache(
    daemon: Running, raw: aioredis.Redis, redis_prefix: str
) -> None:
    stream = stream_of(daemon)
    for key in ("a", "b", "c"):
        await raw.set(f"{redis_prefix}cache:svc:{key}", "1")
    await raw.set(f"{redis_prefix}cache:svc:keep", "1")
    await raw.xadd(
        stream,
        {
            "envelope": json.dumps(
                {
                    "v": 1,
                    "id": "inv-1",
                    "type": "cache.invalidate",
                    "data": {"namespace": "svc", "keys": ["a"], "pattern": "[bc]"},
                }
            )
        },
    )

    async def gone() -> bool:
        return await raw.exists(*(f"{redis_prefix}cache:svc:{k}" for k in "abc")) == 0

    await eventually(gone)
    assert await raw.exists(f"{redis_prefix}cache:svc:keep") == 1


async def test_published_envelopes_are_handled_the_same_way_at_most_once(
    daemon: Running, raw: aioredis.Redis, db: asyncpg.Connection
) -> None:
    stream = stream_of(daemon)
    await eventually(lambda: _subscribed(raw, stream))
    await raw.publish(stream, requested("pub-1", riskScore=75))
    await raw.publish(stream, b"garbage")

    async def done() -> bool:
        return await db.fetchval("SELECT count(*) FROM commands") == 1 and (
            len(await dead_letters(raw, daemon)) == 1
        )

    await eventually(done)
    assert await db.fetchval("SELECT status FROM commands") == "awaiting_approval"
    (letter,) = await dead_letters(raw, daemon)
    assert letter["path"] == "publish"


async def _subscribed(raw: aioredis.Redis, channel: str) -> bool:
    return await subscribers(raw, channel) > 0


async def test_every_state_change_is_announced_with_ids_an_agent_can_match(
    daemon: Running, raw: aioredis.Redis, redis_prefix: str
) -> None:
    listener = await listen(
        raw, f"{redis_prefix}events", f"{redis_prefix}commands", f"{redis_prefix}approvals"
    )
    seen: dict[str, list[dict[str, Any]]] = {}

    async def collect(until: Callable[[], bool]) -> None:
        async with asyncio.timeout(20):
            while not until():
                msg = await listener.get_message(ignore_subscribe_messages=True, timeout=0.5)
                if msg is not None:
                    seen.setdefault(msg["channel"].decode(), []).append(json.loads(msg["data"]))

    stream = stream_of(daemon)
    await raw.xadd(stream, {"envelope": requested("ev-1", riskScore=90)})
    await raw.xadd(stream, {"envelope": requested("ev-2")})
    await collect(
        lambda: (
            [len(seen.get(f"{redis_prefix}{c}", [])) for c in ("events", "commands", "approvals")]
            == [3, 2, 1]
        )
    )
    events = seen[f"{redis_prefix}events"]
    kinds = sorted(e["type"] for e in events)
    assert kinds == ["approval.requested", "command.created", "command.created"]
    created = {e["data"]["requestId"]: e for e in events if e["type"] == "command.created"}
    assert created["ev-1"]["data"]["status"] == "awaiting_approval"
    assert created["ev-2"]["data"]["status"] == "approved"
    assert all(e["v"] == 1 and e["source"] == "jarvisd" and e["id"] for e in events)
    requested_event = next(e for e in events if e["type"] == "approval.requested")
    assert requested_event["data"]["requestId"] == "ev-1"
    assert len(seen[f"{redis_prefix}commands"]) == 2
    assert len(seen[f"{redis_prefix}approvals"]) == 1
    await raw.xadd(stream, {"envelope": status("command.started", "ev-2")})
    await collect(lambda: len(seen.get(f"{redis_prefix}events", [])) >= 4)
    updated = seen[f"{redis_prefix}events"][-1]
    assert (updated["type"], updated["data"]["status"], updated["data"]["previous"]) == (
        "command.updated",
        "running",
        "approved",
    )
    await listener.aclose()


async def test_a_postgres_outage_holds_the_batch_and_loses_nothing(
    daemon: Running, raw: aioredis.Redis, db: asyncpg.Connection, servers: Servers, pg_dsn: str
) -> None:
    """PostgreSQL refuses the daemon's connections for a while: the bus waits
    with the batch in hand, nothing is dead-lettered or counted against the
    envelopes, and once PostgreSQL is back every envelope is committed once."""
    name = pg_dsn.split("?")[0].rsplit("/", 1)[1]
    admin = await asyncpg.connect(servers.postgres_dsn)
    stream = stream_of(daemon)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        for i in range(50):
            await raw.xadd(stream, {"envelope": requested(f"outage-{i}")})

        async def held() -> bool:
            return daemon.daemon.supervisor.get("bus").snapshot()["bus"]["outages"] >= 2

        await eventually(held)
        assert await raw.xlen(f"{stream}:dead") == 0
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    check = await asyncpg.connect(pg_dsn)
    try:

        async def all_in() -> bool:
            return await check.fetchval("SELECT count(*) FROM commands") == 50 and await drained(
                raw, daemon
            )

        await eventually(all_in, timeout=30)
    finally:
        await check.close()
    assert await raw.xlen(f"{stream}:dead") == 0
    groups = await raw.xinfo_groups(stream)
    assert groups[0]["pending"] == 0
