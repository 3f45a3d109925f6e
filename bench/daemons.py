"""Several daemons on one stream: ingest throughput of N `jarvisd run`
processes sharing one PostgreSQL database and one inbox, against one daemon,
in the same run; on one Redis and on a local Redis Cluster (3 primaries,
3 replicas). Each run checks that every envelope became exactly one command.

    python -m bench.daemons [--envelopes 30000] [--daemons 3] [--no-cluster] [--json FILE]

Servers: JARVISD_TEST_POSTGRES_DSN / JARVISD_TEST_REDIS_URL, else embedded
ones; the cluster is started here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import aiohttp
import asyncpg

from actors.redis_link import connect_redis
from bench.bus import envelope
from bench.report import Report
from tests.cluster import LocalCluster, free_cluster_ports
from tests.servers import dsn_with_database


async def _ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon on port {port} did not become ready")
            try:
                async with session.get(f"http://127.0.0.1:{port}/health/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def ingest(pg_admin: str, redis_url: str, daemons: int, n: int) -> float:
    """Envelopes per second from the first XADD to the last row committed."""
    name = f"jarvisd_bench_n_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_admin)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = dsn_with_database(pg_admin, name)
    prefix = f"benchn:{uuid.uuid4().hex[:6]}:"
    stream = f"{prefix}inbox"
    base = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    procs: list[subprocess.Popen[bytes]] = []
    folders: list[str] = []
    raw = connect_redis(redis_url, name="jarvisd-bench")
    try:
        for i, port in enumerate(free_cluster_ports(daemons)):
            folder = tempfile.mkdtemp(prefix="jarvisd-bench-n-")
            folders.append(folder)
            env = base | {
                "JARVISD_POSTGRES__DSN": dsn,
                "JARVISD_REDIS__URL": redis_url,
                "JARVISD_REDIS__PREFIX": prefix,
                "JARVISD_BUS__STREAM": stream,
                "JARVISD_BUS__SHARED_INBOX": "true",
                "JARVISD_DAEMON__STATE_DIR": folder,
                "JARVISD_DAEMON__NAME": f"d{i}",
                "JARVISD_DAEMON__LOG_LEVEL": "warning",
                "JARVISD_HTTP__PORT": str(port),
            }
            proc = subprocess.Popen(  # noqa: ASYNC220 - a few, at bench start
                [sys.executable, "-m", "jarvisd", "run"],
                env=env,
                cwd=folder,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(proc)
            await _ready(port, proc)
        db = await asyncpg.connect(dsn)
        try:
            started = time.perf_counter()
            for start in range(0, n, 1000):
                async with raw.pipeline(transaction=False) as pipe:
                    for i in range(start, min(start + 1000, n)):
                        pipe.xadd(stream, {"envelope": envelope(f"n-{i}")})
                    await pipe.execute()
            while await db.fetchval("SELECT count(*) FROM commands") < n:
                await asyncio.sleep(0.02)
            rate = n / (time.perf_counter() - started)
            await asyncio.sleep(0.5)  # anything doubled would show by now
            count, distinct = await db.fetchrow(
                "SELECT count(*), count(DISTINCT request_id) FROM commands"
            )
            if (count, distinct) != (n, n):
                raise RuntimeError(f"{count} commands, {distinct} distinct, for {n} envelopes")
        finally:
            await db.close()
        return rate
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        await raw.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def run(
    pg: str, targets: list[tuple[str, str]], args: argparse.Namespace, report: Report
) -> None:
    print(f"ingest of {args.envelopes:,} envelopes into one inbox, each committed once:")
    for label, url in targets:
        one = await ingest(pg, url, 1, args.envelopes)
        report.add(f"{label}, 1 daemon ingest", one, "env/s")
        many = await ingest(pg, url, args.daemons, args.envelopes)
        report.add(
            f"{label}, {args.daemons} daemons ingest",
            many,
            "env/s",
            floor=one,
            floor_name="1 daemon",
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--envelopes", type=int, default=30_000)
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--no-cluster", action="store_true")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    from tests.servers import Servers

    servers = Servers.start()
    cluster = None if args.no_cluster else LocalCluster.start()
    report = Report("daemons")
    try:
        targets = [("Redis", servers.redis_url)]
        if cluster is not None:
            targets.append(("Redis Cluster", cluster.url))
        print(f"(PostgreSQL at {servers.postgres_dsn}; {os.cpu_count()} CPUs)")
        asyncio.run(run(servers.postgres_dsn, targets, args, report))
    finally:
        if cluster is not None:
            cluster.stop()
        servers.stop()
        if args.json:
            report.write(args.json)


if __name__ == "__main__":
    main()
