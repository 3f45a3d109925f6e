"""Many WebSocket subscribers on one daemon, against as many raw Redis
subscribers of the same broadcasts, in the same run.

    python -m bench.sockets [--clients 10000] [--rate 2] [--seconds 10]
                            [--readers 4] [--json FILE]

1. The daemon's resident memory when ready, then with ``--clients``
   WebSockets open, each subscribed to one channel: what a connection costs.
2. ``--rate`` broadcasts a second for ``--seconds`` (PUBLISH on Redis, the
   send time inside): every client must get every one (none dropped: each
   reader waits for all of its clients' messages, and the daemon's pub/sub
   counts no subscriber let go), PUBLISH to arrival per delivery.
3. The same broadcasts to raw Redis subscribers (as many as the server's
   ``maxclients`` allows, up to ``--clients``): the floor.

The clients are light protocol readers (``bench.light``) spread over
``--readers`` processes, so that the measuring side costs as little as it
can; on a small machine they share its cores with the daemon and Redis.
The daemon is configured for the crowd (http.max_websockets and the
per-user caps raised): the defaults keep one user to 100 WebSockets.
Servers: JARVISD_TEST_POSTGRES_DSN / JARVISD_TEST_REDIS_URL, else embedded ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
import uuid
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.bus import publish_steady, report_fanout
from bench.daemon import BenchDaemon, bench_daemon, run_bench
from bench.overload import rss_mb
from bench.report import Report

LIMIT_NOTE = "the daemon's http.max_websockets and per-user caps raised for the benchmark"


async def open_readers(
    kind: str, target: str, token: str, channel: str, clients: int, readers: int, count: int
) -> list[asyncio.subprocess.Process]:
    """Reader processes, each with its share of ``clients``, all subscribed."""
    shares = [clients // readers + (i < clients % readers) for i in range(readers)]
    procs = []
    for n in shares:
        if not n:
            continue
        proc = await asyncio.create_subprocess_exec(
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
            str(count),
            stdout=asyncio.subprocess.PIPE,
        )
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 600)
        if line.strip() != b"ready":
            raise RuntimeError(f"a {kind} reader did not get its clients subscribed")
    return procs


async def collect(procs: list[asyncio.subprocess.Process]) -> list[float]:
    lat: list[float] = []
    for proc in procs:
        out, _err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError("a reader did not get every message (a client was dropped?)")
        lat += json.loads(out)
    return lat


async def pubsub_stats(d: BenchDaemon) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {d.token}"}) as http,
        http.get(f"{d.base}/stats") as resp,
    ):
        doc = await resp.json()
    for actor in doc["actors"].values():
        if "pubsub" in actor:
            return dict(actor["pubsub"])
    raise RuntimeError("no pub/sub figures in /stats")


async def raw_room(redis_url: str, wanted: int) -> int:
    """How many raw subscribers the server takes besides its other clients."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        maxclients = int((await client.config_get("maxclients"))["maxclients"])
        connected = int((await client.info("clients"))["connected_clients"])
    finally:
        await client.aclose()
    return max(0, min(wanted, maxclients - connected - 50))


async def run(pg: str, redis_url: str, args: argparse.Namespace, report: Report) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.clients + 1000  # the daemon's sockets, each process its own table
    if hard < wanted:
        args.clients = max(100, hard - 1000)
        wanted = args.clients + 1000
        print(f"(ulimit -Hn is {hard}: {args.clients:,} clients)")
    # The daemon and the readers inherit it.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    total = max(1, int(args.rate * args.seconds))
    channel = f"bench-many-{uuid.uuid4().hex[:6]}"
    settings = {
        "HTTP__MAX_WEBSOCKETS": str(args.clients + 100),
        "HTTP__MAX_WEBSOCKETS_PER_PRINCIPAL": str(args.clients + 100),
        "PUBSUB__MAX_SUBSCRIPTIONS_PER_PRINCIPAL": str(args.clients + 100),
        "HTTP__MAX_IN_FLIGHT": str(args.clients + 1000),
    }
    async with bench_daemon(pg, redis_url, **settings) as d:
        await asyncio.sleep(1)
        idle = rss_mb(d.pid)
        started = time.perf_counter()
        procs = await open_readers(
            "ws", d.base, d.token, channel, args.clients, args.readers, total
        )
        opened = time.perf_counter() - started
        await asyncio.sleep(1)
        crowd = rss_mb(d.pid)
        await publish_steady(redis_url, channel, args.rate, total)
        ws = await collect(procs)
        after = rss_mb(d.pid)
        stats = await pubsub_stats(d)
    raws = await raw_room(redis_url, args.clients)
    procs = await open_readers("raw", redis_url, "", channel, raws, args.readers, total)
    await publish_steady(redis_url, channel, args.rate, total)
    raw = await collect(procs)

    n = args.clients
    print(f"{n:,} WebSocket subscribers on one daemon ({LIMIT_NOTE}):")
    report.add("daemon RSS, ready", idle, "MB")
    report.add(f"daemon RSS, {n:,} WebSockets subscribed", crowd, "MB")
    report.add(f"daemon RSS, {n:,} WebSockets after the broadcasts", after, "MB")
    report.add("RSS a WebSocket", (crowd - idle) * 1024 / n, "KB")
    report.add(f"opening {n:,} WebSockets (subscribed)", opened, "s")
    print(f"{total} broadcasts at {args.rate}/s to every subscriber:")
    report.add("deliveries to WebSockets", len(ws), "messages", note=f"of {n * total:,}")
    report.add(
        "subscribers the daemon let go (too slow)", stats["droppedSubscribers"], "subscribers"
    )
    report.add(f"raw Redis subscribers (the floor; the server's room: {raws:,})", raws, "clients")
    report.add("deliveries to raw Redis subscribers", len(raw), "messages")
    report_fanout(report, ws, raw)
    if len(ws) != n * total or stats["droppedSubscribers"]:
        raise SystemExit("bench.sockets: a WebSocket subscriber missed messages")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    run_bench(
        "sockets",
        args.json,
        lambda servers, report: run(servers.postgres_dsn, servers.redis_url, args, report),
    )


if __name__ == "__main__":
    main()
