"""Replay to a resuming WebSocket: 100,000 events written to the outbox, then
a client subscribes with ``since`` before all of them and is sent every one
from PostgreSQL, in id order. Measured against the raw floor in the same run:
asyncpg alone reading the same events in pages of 1,000.

Then pruning: the same events made older than the retention and deleted as
the relay deletes them (batches of 10,000, one short transaction each),
against one DELETE of a copy of them (one long transaction).

    python -m bench.replay [--events 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import asyncpg

from actors.outbox.relay import PRUNE_BATCH, prune_batch
from bench.daemon import bench_daemon, run_bench
from bench.report import Report
from tests.servers import Servers

PAGE = 1000
BODY = (
    ',"type":"command.created","source":"jarvisd","ts":"2026-11-30T00:00:00.000Z","userId":1,'
    '"data":{"commandId":1,"requestId":"bench-replay","sender":"agent:bench","status":"approved",'
    '"action":"note_take","type":"agent","source":"bench","riskScore":10,'
    '"riskCategory":"low","approvalId":null}}'
)


async def fill(dsn: str, n: int) -> int:
    """``n`` command.created events in the outbox; the highest id."""
    db = await asyncpg.connect(dsn)
    try:
        top = await db.fetchval(
            "WITH w AS (INSERT INTO events (kind, type, user_id, body) "
            "SELECT 'commands', 'command.created', 1, $1 FROM generate_series(1, $2) "
            "RETURNING id) SELECT max(id) FROM w",
            BODY,
            n,
        )
        # Let the relay publish them first: the replay is measured alone.
        while await db.fetchval("SELECT last_id FROM event_relay WHERE name = 'redis'") < top:
            await asyncio.sleep(0.2)
        return int(top)
    finally:
        await db.close()


async def raw_floor(dsn: str, n: int) -> float:
    db = await asyncpg.connect(dsn)
    try:
        started, cursor, got = time.perf_counter(), 0, 0
        while got < n:
            rows = await db.fetch(
                "SELECT id, body FROM events WHERE id > $1 ORDER BY id LIMIT $2", cursor, PAGE
            )
            if not rows:
                break
            got += len(rows)
            cursor = rows[-1]["id"]
        return got / (time.perf_counter() - started)
    finally:
        await db.close()


async def replay(base: str, token: str, channel: str, n: int) -> tuple[float, bool]:
    """Events per second from ``subscribe`` to the n-th event, and whether
    they came in id order, each once."""
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            f"{base}/ws", headers={"Authorization": f"Bearer {token}"}, max_msg_size=0
        ) as ws,
    ):
        await ws.send_str(json.dumps({"op": "subscribe", "channels": [channel], "since": 0}))
        started, got, last, ordered = time.perf_counter(), 0, 0, True
        while got < n:
            msg = await ws.receive(timeout=60)
            doc = json.loads(msg.data)
            if doc.get("type") != "message":
                continue
            got += 1
            found = int(doc["data"]["id"])
            ordered = ordered and found > last
            last = found
        return got / (time.perf_counter() - started), ordered


async def pruning(dsn: str, top: int) -> tuple[float, float, float]:
    """Events/s pruned in batches, the longest batch in ms, and events/s of
    one DELETE of a copy of the same rows (the floor)."""
    db = await asyncpg.connect(dsn)
    try:
        await db.execute("UPDATE events SET created_at = now() - interval '8 days'")
        await db.execute("CREATE TABLE events_copy (LIKE events INCLUDING ALL)")
        await db.execute("INSERT INTO events_copy OVERRIDING SYSTEM VALUE SELECT * FROM events")
        await db.execute("VACUUM ANALYZE events")
        await db.execute("VACUUM ANALYZE events_copy")
        started = time.perf_counter()
        status = await db.execute("DELETE FROM events_copy WHERE id <= $1", top)
        floor = int(status.split()[-1]) / (time.perf_counter() - started)
        started, deleted, longest = time.perf_counter(), 0, 0.0
        while True:
            t = time.perf_counter()
            went = await prune_batch(db, top, 7 * 86400)
            longest = max(longest, time.perf_counter() - t)
            deleted += went
            if went < PRUNE_BATCH:
                break
        return deleted / (time.perf_counter() - started), longest * 1000, floor
    finally:
        await db.close()


async def run(servers: Servers, report: Report, n: int) -> None:
    async with bench_daemon(servers.postgres_dsn, servers.redis_url) as d:
        top = await fill(d.dsn, n)
        floor = await raw_floor(d.dsn, n)
        rate, ordered = await replay(d.base, d.token, f"{d.prefix}events", n)
        pruned, longest, prune_floor = await pruning(d.dsn, top)
    print(f"Replay of {n:,} events to a WebSocket subscribing with since (in order: {ordered}):")
    report.add("replay, raw asyncpg reads (pages of 1,000)", floor, "events/s")
    report.add(
        "replay, outbox → resuming WebSocket (jarvisd)",
        rate,
        "events/s",
        floor=floor,
        floor_name="raw asyncpg reads",
    )
    print(f"Pruning the same {n:,} events, past the retention:")
    report.add("prune, one DELETE of a copy (one transaction)", prune_floor, "events/s")
    report.add(
        f"prune, batches of {PRUNE_BATCH:,} (jarvisd)",
        pruned,
        "events/s",
        floor=prune_floor,
        floor_name="one DELETE",
    )
    report.add("prune, the longest batch (its transaction)", longest, "ms")
    if not ordered:
        raise SystemExit("events came out of order")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    run_bench("replay", args.json, lambda s, r: run(s, r, args.events))


if __name__ == "__main__":
    main()
