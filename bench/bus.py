"""Agent bus and pub/sub benchmark, floors measured in the same run.

    python -m bench.bus [--envelopes 50000] [--rate 2000] [--seconds 10]
                        [--clients 100] [--ws-rate 1000] [--json FILE]

1. Sustained ingest: XADD of command.requested envelopes (pipelined, faster
   than the daemon reads) to rows committed in PostgreSQL by a separate
   `jarvisd run`; against raw asyncpg executemany of 1,000-row transactions
   into the same table, and against one set-based insert (unnest) a
   transaction: the commands rows alone, where the daemon also writes each
   command's audit row, its event and, for some, an approval request.
2. Latency from XADD to the command.created event (published after commit)
   at a steady rate.
3. Publish → WebSocket delivery at a steady rate to many clients, against
   raw Redis subscribers receiving the same PUBLISH.

Servers: JARVISD_TEST_POSTGRES_DSN / JARVISD_TEST_REDIS_URL, else embedded ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from actors import migrate as migrations
from bench.daemon import BenchDaemon, bench_daemon, run_bench
from bench.light import read_raw_redis, read_websockets
from bench.report import Report
from tests.servers import dsn_with_database


def envelope(request_id: str, score: int = 10) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "id": request_id,
            "type": "command.requested",
            "source": "bench",
            "data": {
                "action": "turn_on_light",
                "type": "voice",
                "parameters": {"room": "kitchen", "level": 80},
                "description": "Turn on the kitchen light",
                "riskScore": score,
            },
        }
    ).encode()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def raw_floor(pg_admin_dsn: str, rows: int, *, set_based: bool = False) -> float:
    """Raw asyncpg into a migrated commands table (all its indexes), 1,000
    rows per transaction: ``executemany`` (a row at a time), or with
    ``set_based`` one ``INSERT … SELECT FROM unnest(…) ON CONFLICT DO
    NOTHING`` a transaction (the set-based floor: the commands rows alone,
    without their audit rows, events or approvals)."""
    name = f"jarvisd_bench_floor_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(dsn_with_database(pg_admin_dsn, name))
    try:
        await migrations.migrate(conn)
        params = json.dumps({"room": "kitchen", "level": 80})
        started = time.perf_counter()
        for start in range(0, rows, 1000):
            ids = [f"floor-{i}" for i in range(start, min(start + 1000, rows))]
            async with conn.transaction():
                if set_based:
                    n = len(ids)
                    await conn.execute(
                        "INSERT INTO commands (request_id, source, type, action, parameters, "
                        "description, status, risk_score, risk_category, sender) "
                        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
                        "$5::jsonb[], $6::text[], $7::text[], $8::smallint[], $9::text[], "
                        "$10::text[]) ON CONFLICT (sender, request_id) DO NOTHING",
                        ids,
                        ["bench"] * n,
                        ["voice"] * n,
                        ["turn_on_light"] * n,
                        [params] * n,
                        ["Turn on the kitchen light"] * n,
                        ["approved"] * n,
                        [10] * n,
                        ["LOW"] * n,
                        ["inbox"] * n,
                    )
                    continue
                await conn.executemany(
                    "INSERT INTO commands (request_id, source, type, action, parameters, description, "
                    "status, risk_score, risk_category, sender) "
                    "VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, 'inbox')",
                    [
                        (
                            rid,
                            "bench",
                            "voice",
                            "turn_on_light",
                            params,
                            "Turn on the kitchen light",
                            "approved",
                            10,
                            "LOW",
                        )
                        for rid in ids
                    ],
                )
        return rows / (time.perf_counter() - started)
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def ingest(d: BenchDaemon, redis_url: str, n: int) -> tuple[float, float]:
    raw = aioredis.Redis.from_url(redis_url)
    db = await asyncpg.connect(d.dsn)
    try:
        started = time.perf_counter()
        for start in range(0, n, 1000):
            async with raw.pipeline(transaction=False) as pipe:
                for i in range(start, min(start + 1000, n)):
                    pipe.xadd(
                        d.stream, {"envelope": envelope(f"ingest-{i}", 90 if i % 50 == 0 else 10)}
                    )
                await pipe.execute()
        produced = time.perf_counter() - started
        while await db.fetchval("SELECT count(*) FROM commands") < n:
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        return n / elapsed, n / produced
    finally:
        await db.close()
        await raw.aclose()


async def latency(d: BenchDaemon, redis_url: str, rate: int, seconds: float) -> list[float]:
    raw = aioredis.Redis.from_url(redis_url)
    listener = raw.pubsub()
    await listener.subscribe(f"{d.prefix}commands")
    sent: dict[str, float] = {}
    got: list[float] = []
    total = int(rate * seconds)

    async def listen() -> None:
        while len(got) < total:
            msg = await listener.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None:
                continue
            doc = json.loads(msg["data"])
            rid = doc["data"].get("requestId", "")
            if doc["type"] == "command.created" and rid in sent:
                got.append((time.perf_counter() - sent[rid]) * 1000)

    listening = asyncio.create_task(listen())
    started = time.perf_counter()
    for i in range(total):
        target = started + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        rid = f"lat-{i}"
        sent[rid] = time.perf_counter()
        await raw.xadd(d.stream, {"envelope": envelope(rid)})
    try:
        await asyncio.wait_for(listening, 30)
    finally:
        await listener.aclose()
        await raw.aclose()
    return got


READER_PROCESSES = 2


async def relay_stats(d: BenchDaemon) -> dict[str, Any]:
    """The relay's figures from the daemon's /stats: commit (its NOTIFY
    heard) to the events published on Redis."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{d.base}/stats", headers={"Authorization": f"Bearer {d.token}"}) as resp,
    ):
        stats = await resp.json()
    relay: dict[str, Any] = stats["actors"]["relay"]["relay"]
    return relay


async def fanout(
    kind: str, target: str, token: str, redis_url: str, clients: int, rate: int, seconds: float
) -> list[float]:
    """``clients`` subscribers spread over reader processes (so that the
    measuring side is not the bottleneck); PUBLISH at ``rate`` with the send
    time inside; each reader reports receive minus send (one monotonic clock)."""
    import sys

    total = int(rate * seconds)
    channel = f"bench-{kind}-{uuid.uuid4().hex[:6]}"
    per = [
        clients // READER_PROCESSES + (i < clients % READER_PROCESSES)
        for i in range(READER_PROCESSES)
    ]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.bus",
            "--reader",
            kind,
            "--target",
            target,
            "--token",
            token,
            "--channel",
            channel,
            "--reader-clients",
            str(n),
            "--count",
            str(total),
            stdout=asyncio.subprocess.PIPE,
        )
        for n in per
        if n
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert (await proc.stdout.readline()).strip() == b"ready"
    await publish_steady(redis_url, channel, rate, total)
    lat: list[float] = []
    for proc in procs:
        out, _err = await proc.communicate()
        lat += json.loads(out)
    return lat


async def publish_steady(redis_url: str, channel: str, rate: int, total: int) -> None:
    raw = aioredis.Redis.from_url(redis_url)
    await raw.ping()  # connected before the clock starts: its set-up is no delivery's
    started = time.perf_counter()
    for i in range(total):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await raw.publish(channel, json.dumps({"t": time.perf_counter(), "n": i}))
    await raw.aclose()


async def run(pg: str, redis_url: str, args: argparse.Namespace, report: Report) -> None:
    floor = await raw_floor(pg, args.envelopes)
    set_floor = await raw_floor(pg, args.envelopes, set_based=True)
    async with bench_daemon(pg, redis_url) as d:
        rate, produced = await ingest(d, redis_url, args.envelopes)
    # A daemon of its own for the steady rate: its relay's figures are that run's.
    async with bench_daemon(pg, redis_url) as d:
        lat = await latency(d, redis_url, args.rate, args.seconds)
        relay = await relay_stats(d)
        ws = await fanout(
            "ws", d.base, d.token, redis_url, args.clients, args.ws_rate, args.seconds
        )
    raw = await fanout("raw", redis_url, "", redis_url, args.clients, args.ws_rate, args.seconds)
    print(f"Ingest of {args.envelopes:,} command.requested envelopes (1 in 50 needing approval):")
    report.add("ingest, raw asyncpg executemany (1,000-row transactions)", floor, "rows/s")
    report.add(
        "ingest, raw set-based INSERT … SELECT FROM unnest (1,000-row transactions)",
        set_floor,
        "rows/s",
        floor=floor,
        floor_name="raw asyncpg executemany",
    )
    report.add("ingest, XADD (the producer, pipelined)", produced, "envelopes/s")
    report.add(
        "ingest, stream → committed rows (jarvisd)",
        rate,
        "rows/s",
        floor=floor,
        floor_name="raw asyncpg executemany",
    )
    report.add(
        "ingest, jarvisd against the set-based insert",
        rate,
        "rows/s",
        floor=set_floor,
        floor_name="raw set-based insert",
    )
    print(f"XADD → command.created (after commit) at {args.rate}/s for {args.seconds:g} s:")
    report.add("XADD→command.created p50", statistics.median(lat), "ms")
    report.add("XADD→command.created p99", pct(lat, 0.99), "ms")
    report.add("XADD→command.created max", max(lat), "ms")
    report.add("relay, commit→PUBLISH p50", relay["lagMsP50"], "ms")
    report.add("relay, commit→PUBLISH p99", relay["lagMsP99"], "ms")
    print(f"PUBLISH → {args.clients} subscribers at {args.ws_rate} msg/s for {args.seconds:g} s:")
    report_fanout(report, ws, raw)


def report_fanout(report: Report, ws: list[float], raw: list[float]) -> None:
    """PUBLISH → arrival at jarvisd's WebSockets against raw Redis subscribers
    of the same messages (p50 and p99, each with its floor)."""
    raw_p50, raw_p99 = statistics.median(raw), pct(raw, 0.99)
    report.add("PUBLISH→raw Redis subscribers p50", raw_p50, "ms")
    report.add("PUBLISH→raw Redis subscribers p99", raw_p99, "ms")
    for what, value, floor in (
        ("p50", statistics.median(ws), raw_p50),
        ("p99", pct(ws, 0.99), raw_p99),
    ):
        report.add(
            f"PUBLISH→jarvisd WebSocket {what}",
            value,
            "ms",
            floor=floor,
            floor_name=f"raw Redis subscribers {what}",
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--envelopes", type=int, default=50_000)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--ws-rate", type=int, default=1000)
    parser.add_argument("--json", help="also write every figure to this file")
    # A reader process of the fan-out measurement (internal).
    parser.add_argument("--reader", choices=["ws", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--channel", help=argparse.SUPPRESS)
    parser.add_argument("--reader-clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader == "ws":
        lat = asyncio.run(
            read_websockets(args.target, args.token, args.channel, args.reader_clients, args.count)
        )
        print(json.dumps(lat))
        return
    if args.reader == "raw":
        lat = asyncio.run(
            read_raw_redis(args.target, args.channel, args.reader_clients, args.count)
        )
        print(json.dumps(lat))
        return
    run_bench(
        "bus",
        args.json,
        lambda servers, report: run(servers.postgres_dsn, servers.redis_url, args, report),
    )


if __name__ == "__main__":
    main()
