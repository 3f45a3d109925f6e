"""Replay to a resuming WebSocket: 100,000 events written to the outbox, then
a client subscribes with ``since`` before all of them and is sent every one
from PostgreSQL, in id order. Measured against the raw floor in the same run:
asyncpg alone reading the same events in pages of 1,000.

    python -m bench.replay [--events 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import asyncpg

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


async def run(servers: Servers, report: Report, n: int) -> None:
    async with bench_daemon(servers.postgres_dsn, servers.redis_url) as d:
        await fill(d.dsn, n)
        floor = await raw_floor(d.dsn, n)
        rate, ordered = await replay(d.base, d.token, f"{d.prefix}events", n)
    print(f"Replay of {n:,} events to a WebSocket subscribing with since (in order: {ordered}):")
    report.add("replay, raw asyncpg reads (pages of 1,000)", floor, "events/s")
    report.add(
        "replay, outbox → resuming WebSocket (jarvisd)",
        rate,
        "events/s",
        floor=floor,
        floor_name="raw asyncpg reads",
    )
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
