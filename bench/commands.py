"""Commands benchmark: list pages on 1,000,000 rows, and the batched ingest path.

    python -m bench.commands [--rows 1000000] [--batch 20000] [--json FILE]

Servers: JARVISD_TEST_POSTGRES_DSN (an account that may create databases),
else an embedded PostgreSQL. Everything runs in a scratch database that is
dropped at the end. Figures, all from the same run:

- the batched insert path (persistence actor, IngestCommands) in rows/s
  against raw asyncpg ``executemany`` of the same rows;
- p50/p99 of the first page, of a page 500,000 rows deep by cursor, and of
  the same depth by offset (refused by the API past 5,000 rows; measured
  in raw SQL to show why).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from actors import migrate as migrations
from actors import persistence as m
from actors.data.listing import MAX_OFFSET_PARAM, ListError, encode_cursor, parse_list
from actors.data.model import CommandCreate
from actors.data.repo import COMMANDS, init_connection
from actors.persistence import Persistence
from bench.daemon import run_bench
from bench.report import Report
from config import ApprovalSettings, PostgresSettings
from tests.servers import dsn_with_database


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(n: int, call: Callable[[], Awaitable[Any]]) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def line(report: Report, label: str, samples: list[float]) -> None:
    """Two figures: the p50 and the p99 of ``samples``."""
    note = f"n={len(samples)}"
    report.add(f"{label} p50", statistics.median(samples), "ms", note=note)
    report.add(f"{label} p99", pct(samples, 0.99), "ms", note=note)


async def ingest(dsn: str, actor: Persistence, total: int, report: Report) -> None:
    rows = [
        CommandCreate(
            action=f"act_{i % 50}",
            type="agent",
            request_id=f"bench-{uuid.uuid4()}",
            parameters={"i": i},
            description=f"benchmark command {i}",
            risk_score=i % 60,
        )
        for i in range(total)
    ]
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    sql = (
        "INSERT INTO commands (request_id, user_id, source, type, action, parameters, description, status, "
        "risk_score, risk_category, sender) VALUES ($1, NULL, '', $2, $3, $4, $5, 'approved', $6, 'LOW', 'inbox')"
    )
    raw_rates, actor_rates = [], []
    batch = 1000
    for round_ in range(3):  # interleaved rounds, fresh request ids each time
        raw_args = [
            (
                f"raw-{round_}-{r.request_id}",
                r.type,
                r.action,
                r.parameters,
                r.description,
                r.risk_score,
            )
            for r in rows
        ]
        started = time.perf_counter()
        for i in range(0, total, batch):
            await conn.executemany(sql, raw_args[i : i + batch])
        raw_rates.append(total / (time.perf_counter() - started))
        mine = [
            CommandCreate(
                action=r.action,
                type=r.type,
                request_id=f"actor-{round_}-{r.request_id}",
                parameters=r.parameters,
                description=r.description,
                risk_score=r.risk_score,
            )
            for r in rows
        ]
        started = time.perf_counter()
        for i in range(0, total, batch):
            chunk = tuple((row, None, None, "inbox") for row in mine[i : i + batch])
            await actor.ask(m.IngestCommands(rows=chunk), timeout=120)
        actor_rates.append(total / (time.perf_counter() - started))
    # Idempotency: the same batch again inserts nothing and says so.
    again = await actor.ask(
        m.IngestCommands(rows=tuple((row, None, None, "inbox") for row in mine[:batch])),
        timeout=120,
    )
    assert all(done.outcome == "exists" for done in again)
    await conn.close()
    raw, ours = statistics.median(raw_rates), statistics.median(actor_rates)
    print(f"batched insert, {total:,} rows in batches of {batch} (median of 3 rounds):")
    report.add("batched insert, raw asyncpg executemany", raw, "rows/s")
    report.add(
        "batched insert, persistence actor IngestCommands",
        ours,
        "rows/s",
        floor=raw,
        floor_name="raw asyncpg executemany",
    )


async def load(dsn: str, rows: int, report: Report) -> None:
    conn = await asyncpg.connect(dsn)
    started = time.perf_counter()
    # Bulk load without the secondary indexes, then build them: how a restore would do it.
    indexes = await conn.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'commands' "
        "AND indexname NOT LIKE '%pkey' AND indexname NOT LIKE '%request_id%'"
    )
    for ix in indexes:
        await conn.execute(f'DROP INDEX "{ix["indexname"]}"')
    await conn.execute(
        "INSERT INTO commands (request_id, user_id, source, type, action, parameters, description, status, "
        "risk_score, risk_category, created_at, sender) "
        "SELECT 'load-' || g, NULL, 'bench', (ARRAY['voice','text','api','agent'])[1 + g % 4], 'act_' || (g % 50), "
        "jsonb_build_object('i', g), 'loaded command number ' || g, "
        "(ARRAY['approved','succeeded','failed','awaiting_approval'])[1 + g % 4], g % 100, "
        "CASE WHEN g % 100 < 40 THEN 'LOW' WHEN g % 100 < 70 THEN 'MEDIUM' WHEN g % 100 < 90 THEN 'HIGH' "
        "ELSE 'CRITICAL' END, now() - make_interval(secs => ($1 - g) / 100.0), 'inbox' "
        "FROM generate_series(1, $1) AS g",
        rows,
    )
    for ix in indexes:
        await conn.execute(ix["indexdef"])
    await conn.execute("ANALYZE commands")
    total = await conn.fetchval("SELECT count(*) FROM commands")
    await conn.close()
    report.add(
        "bulk load (INSERT ... SELECT, then indexes)",
        time.perf_counter() - started,
        "s",
        note=f"{total:,} commands",
    )


async def pages(dsn: str, actor: Persistence, depth: int, report: Report) -> None:
    conn = await asyncpg.connect(dsn)
    anchor = await conn.fetchrow(
        "SELECT created_at, id FROM commands ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1",
        depth - 1,
    )
    cursor = encode_cursor("-createdAt", anchor["created_at"], anchor["id"])
    first = parse_list(COMMANDS, {"limit": ["50"]})
    deep = parse_list(COMMANDS, {"limit": ["50"], "cursor": [cursor]})
    filtered = parse_list(COMMANDS, {"limit": ["50"], "status": ["failed"], "cursor": [cursor]})
    for _ in range(20):  # warm the caches and the prepared statements
        await actor.ask(m.ListCommands(query=first), timeout=30)
        await actor.ask(m.ListCommands(query=deep), timeout=30)
    print(
        f"list pages of 50 on {await conn.fetchval('SELECT count(*) FROM commands'):,} commands "
        "(through the persistence actor):"
    )
    line(
        report,
        "list page, first page",
        await timed(300, lambda: actor.ask(m.ListCommands(query=first), timeout=30)),
    )
    line(
        report,
        f"list page, {depth:,} rows deep by cursor",
        await timed(300, lambda: actor.ask(m.ListCommands(query=deep), timeout=30)),
    )
    line(
        report,
        f"list page, {depth:,} deep by cursor, status=failed",
        await timed(300, lambda: actor.ask(m.ListCommands(query=filtered), timeout=30)),
    )
    try:
        parse_list(COMMANDS, {"limit": ["50"], "offset": [str(depth)]})
    except ListError as exc:
        print(f"  {depth:,} rows deep by offset: refused by the API ({exc})")
    sql = f"SELECT id FROM commands ORDER BY created_at DESC, id DESC LIMIT 51 OFFSET {depth}"
    line(
        report,
        f"list page, {depth:,} deep by OFFSET (raw SQL, for comparison)",
        await timed(20, lambda: conn.fetch(sql)),
    )
    capped = parse_list(COMMANDS, {"limit": ["50"], "offset": [str(MAX_OFFSET_PARAM)]})
    line(
        report,
        f"list page, {MAX_OFFSET_PARAM:,} deep by offset (the API's cap)",
        await timed(100, lambda: actor.ask(m.ListCommands(query=capped), timeout=30)),
    )
    await conn.close()


async def run(admin_dsn: str, rows: int, batch_rows: int, report: Report) -> None:
    name = f"jarvisd_bench_{os.getpid()}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = dsn_with_database(admin_dsn, name)
    try:
        conn = await asyncpg.connect(dsn)
        await migrations.migrate(conn)
        await conn.close()
        actor = Persistence(
            PostgresSettings(pool_min=2, pool_max=4, migrate_on_start=False),
            dsn,
            approvals=ApprovalSettings(),
        )
        await actor.start()
        await actor.wait_ready(30)
        try:
            await ingest(dsn, actor, batch_rows, report)
            await load(dsn, rows, report)
            await pages(dsn, actor, min(500_000, rows // 2), report)
        finally:
            await actor.stop()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=20_000, help="rows per ingest round")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    run_bench(
        "commands",
        args.json,
        lambda servers, report: run(servers.postgres_dsn, args.rows, args.batch, report),
        redis=False,
    )


if __name__ == "__main__":
    main()
