"""Start-up, memory and overload figures of a real `jarvisd run`.

    python -m bench.overload [--seconds 30] [--json FILE]

1. Start to ready: on the bench's external servers; embedded, first start
   (initdb) and again on the data it made.
2. Idle RSS after ready, against a bare aiohttp server's in the same run, and
   what a process that only imports the runtime dependencies takes.
3. 1,000 WebSocket subscribers and 1,000 sessions held at once: RSS.
4. HTTP overload: the sustainable rate of GET /cache/get/{key} (50 callers
   asking as fast as they are answered), then 2,000 keep-alive clients
   offering 10x that rate for --seconds: answers by status, the daemon's
   peak RSS, and whether it answers normally afterwards.
5. Publish overload: the inbox's sustainable ingest (60,000 envelopes waiting),
   then two producer processes XADDing at 10x that rate for --seconds
   (bench/flood.py): what they achieved, peak RSS, each mailbox's deepest
   fill, and after the drain, every envelope committed exactly once.

Servers: JARVISD_TEST_POSTGRES_DSN / JARVISD_TEST_REDIS_URL, else embedded ones.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg

from actors.redis_link import connect_redis
from bench.bus import envelope
from bench.daemon import BenchDaemon, bench_daemon, run_bench
from bench.flood import flood
from bench.light import keepalive_load
from bench.report import Report
from tests.cluster import free_cluster_ports
from tests.servers import dsn_with_database, unlink_prefix

ROOT = Path(__file__).resolve().parent.parent
# The floor of the idle RSS: a process that imports aiohttp and answers, nothing else.
BARE = """
from aiohttp import web
async def handler(_request):
    return web.Response(body=b'{{"status":"pass"}}', content_type="application/json")
app = web.Application()
app.router.add_get("/", handler)
web.run_app(app, host="127.0.0.1", port={port}, print=None, access_log=None)
"""

# What the runtime dependencies cost before any line of jarvisd runs.
IMPORTS = """
import time
import aiohttp.web, asyncpg, msgspec, redis.asyncio, structlog
print("ready", flush=True)
time.sleep(600)
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def until_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> float:
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        while time.perf_counter() - started < timeout:
            if proc.poll() is not None:
                raise RuntimeError("the daemon exited before it was ready")
            try:
                async with session.get(f"http://127.0.0.1:{port}/health/ready") as resp:
                    if resp.status == 200:
                        return time.perf_counter() - started
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.01)
    raise TimeoutError("the daemon did not become ready")


def spawn(env: dict[str, str], cwd: str) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    return subprocess.Popen(
        [sys.executable, "-m", "jarvisd", "run"],
        env=base | env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def startup(pg: str, redis_url: str, report: Report) -> None:
    (port,) = free_cluster_ports(1)
    folder = tempfile.mkdtemp(prefix="jarvisd-bench-start-")
    name = f"jarvisd_bench_start_{os.getpid()}"
    admin = await asyncpg.connect(pg)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        env = {
            "JARVISD_POSTGRES__DSN": dsn_with_database(pg, name),
            "JARVISD_REDIS__URL": redis_url,
            "JARVISD_REDIS__PREFIX": "bench-start:",
            "JARVISD_HTTP__PORT": str(port),
            "JARVISD_DAEMON__STATE_DIR": folder,
        }
        proc = spawn(env, folder)
        try:
            report.add("start to ready, external servers", await until_ready(port, proc), "s")
        finally:
            stop(proc)
        config = str(ROOT / "jarvisd.toml")
        for what in ("embedded, first start (initdb)", "embedded, data present"):
            proc = subprocess.Popen(  # noqa: ASYNC220 - a few, at bench start
                [sys.executable, "-m", "jarvisd", "run", "--config", config],
                env={k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
                | {"JARVISD_HTTP__PORT": str(port), "JARVISD_DAEMON__STATE_DIR": folder},
                cwd=folder,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                report.add(f"start to ready, {what}", await until_ready(port, proc), "s")
            finally:
                stop(proc)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
            await unlink_prefix(redis_url, "bench-start:")


async def idle_rss(d: BenchDaemon, report: Report) -> int:
    await asyncio.sleep(2)
    pid = d.pid
    (bare_port,) = free_cluster_ports(1)
    bare = subprocess.Popen(  # noqa: ASYNC220 - once
        [sys.executable, "-c", BARE.format(port=bare_port)]
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"http://127.0.0.1:{bare_port}/") as resp:
                        await resp.read()
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        report.add("idle RSS", rss_mb(pid), "MB", floor=rss_mb(bare.pid), floor_name="bare aiohttp")
    finally:
        stop(bare)
    imports = subprocess.Popen(  # noqa: ASYNC220 - once
        [sys.executable, "-c", IMPORTS], stdout=subprocess.PIPE
    )
    try:
        assert imports.stdout is not None
        await asyncio.to_thread(imports.stdout.readline)
        report.add(
            "RSS of a process that only imports aiohttp, asyncpg, redis, structlog, msgspec",
            rss_mb(imports.pid),
            "MB",
        )
    finally:
        imports.kill()
        imports.wait(10)
    return pid


async def many_clients(d: BenchDaemon, pid: int, report: Report, n: int = 1000) -> None:
    auth = {"Authorization": f"Bearer {d.token}"}
    connector = aiohttp.TCPConnector(limit=0)  # one connection a WebSocket, no pool cap
    async with aiohttp.ClientSession(headers=auth, connector=connector) as session:
        async with session.post(d.base + "/users", json={"username": "many"}) as resp:
            user = await resp.json()
        made = 0
        for _ in range(n):
            body = {"userId": user["id"], "data": {"cart": list(range(10))}}
            async with session.post(d.base + "/sessions", json=body) as resp:
                made += resp.status == 201
        sockets = []
        for _ in range(n):
            ws = await session.ws_connect(d.base.replace("http", "ws") + "/ws")
            await ws.send_json({"op": "subscribe", "channels": ["bench-news"]})
            await ws.receive(timeout=10)
            sockets.append(ws)
        async with session.post(
            d.base + "/publish", json={"channel": "bench-news", "message": {"n": 1}}
        ) as resp:
            receivers = (await resp.json()).get("receivers")
        got = sum([(await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT for ws in sockets])
        report.add(
            f"RSS with {len(sockets)} WebSocket subscribers and {made} sessions",
            rss_mb(pid),
            "MB",
            note=f"a message published reached {got} ({receivers} by Redis' count)",
        )
        for ws in sockets:
            await ws.close()


async def sustainable_http(d: BenchDaemon, seconds: float = 5) -> float:
    auth = {"Authorization": f"Bearer {d.token}"}
    done = 0
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.post(
            d.base + "/cache/set", json={"key": "hot", "value": 1, "ttl": 3600}
        ):
            pass
        until = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < until:
                async with session.get(d.base + "/cache/get/hot") as resp:
                    await resp.read()
                    done += resp.status == 200

        await asyncio.gather(*(caller() for _ in range(50)))
    return done / seconds


class Sampler:
    """The daemon's peak RSS, and each mailbox's deepest fill, while a load runs."""

    def __init__(self, pid: int, base: str) -> None:
        self.pid, self.base = pid, base
        self.peak = 0.0
        self.deepest: dict[str, tuple[int, int]] = {}  # actor → (depth, bound)
        self.done = False

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while not self.done:
                self.peak = max(self.peak, rss_mb(self.pid))
                try:
                    async with session.get(self.base + "/stats") as resp:
                        actors = (await resp.json())["actors"]
                except (aiohttp.ClientError, ValueError, KeyError):
                    actors = {}
                for name, doc in actors.items():
                    depth, bound = doc["mailbox"]["depth"], doc["mailbox"]["size"]
                    if depth >= self.deepest.get(name, (-1, 0))[0]:
                        self.deepest[name] = (depth, bound)
                await asyncio.sleep(0.25)

    def report(self, what: str, report: Report) -> None:
        report.add(f"peak RSS under {what}", self.peak, "MB")
        name, (depth, bound) = max(self.deepest.items(), key=lambda kv: kv[1][0] / kv[1][1])
        report.add(
            f"deepest mailbox under {what}", depth, "messages", note=f"{name}, bound {bound}"
        )


async def http_overload(d: BenchDaemon, pid: int, seconds: float, report: Report) -> None:
    rate = await sustainable_http(d)
    report.add("GET /cache/get sustainable rate (50 callers)", rate, "req/s")
    clients = 2000
    per_client = 10 * rate / clients
    sampler = Sampler(pid, d.base)
    sampling = asyncio.create_task(sampler.run())
    lat, not_ok = await keepalive_load(
        d.base, "/cache/get/hot", d.token, clients, per_client, seconds
    )
    sampler.done = True
    await sampling
    peak = sampler.peak
    answered = len(lat)
    report.add(
        f"HTTP at 10x ({10 * rate:,.0f} req/s offered by {clients} clients) for {seconds:g} s",
        answered / seconds,
        "answers/s",
        note=f"{answered - not_ok:,} ok, {not_ok:,} refused (503) or failed; peak RSS {peak:.0f} MB",
    )
    sampler.report("HTTP overload", report)
    after = await sustainable_http(d, 2)
    report.add("GET /cache/get rate right after", after, "req/s", floor=rate, floor_name="before")


async def sustainable_ingest(d: BenchDaemon, db: asyncpg.Connection, n: int) -> float:
    """Envelopes a second the daemon commits when the inbox always has work."""
    raw = connect_redis(os.environ["BENCH_REDIS_URL"], name="jarvisd-bench")
    try:
        base = await db.fetchval("SELECT count(*) FROM commands")
        async with raw.pipeline(transaction=False) as pipe:
            for i in range(n):
                pipe.xadd(d.stream, {"envelope": envelope(f"steady-{i}")})
            await pipe.execute()
        started = time.perf_counter()
        first = await db.fetchval("SELECT count(*) FROM commands") - base
        while (done := await db.fetchval("SELECT count(*) FROM commands") - base) < n:
            await asyncio.sleep(0.05)
        return (done - first) / (time.perf_counter() - started)
    finally:
        await raw.aclose()


async def publish_overload(d: BenchDaemon, pid: int, seconds: float, report: Report) -> None:
    db = await asyncpg.connect(d.dsn)
    try:
        rate = await sustainable_ingest(d, db, 60_000)
        report.add("sustainable inbox ingest", rate, "env/s")
        base = await db.fetchval("SELECT count(*) FROM commands")
        sampler = Sampler(pid, d.base)
        sampling = asyncio.create_task(sampler.run())
        url = os.environ["BENCH_REDIS_URL"]
        produced, offered = await asyncio.to_thread(flood, url, d.stream, 2, seconds, 10 * rate)
        committed_then = await db.fetchval("SELECT count(*) FROM commands") - base
        drain_started = time.perf_counter()
        while await db.fetchval("SELECT count(*) FROM commands") - base < produced:
            if time.perf_counter() - drain_started > 1800:
                raise RuntimeError("the backlog did not drain within 30 minutes")
            await asyncio.sleep(0.2)
        drained = time.perf_counter() - drain_started
        sampler.done = True
        await sampling
        distinct = await db.fetchval(
            "SELECT count(DISTINCT request_id) FROM commands WHERE request_id LIKE 'flood-%'"
        )
        report.add(
            f"publish flood for {seconds:g} s from 2 processes: offered",
            offered,
            "env/s",
            floor=rate,
            floor_name="sustainable ingest",
            note=(
                f"{produced:,} acknowledged by Redis, {committed_then:,} committed when it "
                f"stopped, drained {drained:.0f} s later; {distinct:,} distinct commands"
            ),
        )
        sampler.report("the publish flood", report)
        if distinct != produced:
            raise RuntimeError(f"{distinct} commands for {produced} envelopes")
    finally:
        await db.close()


async def run(pg: str, redis_url: str, args: argparse.Namespace, report: Report) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 16384)), hard))
    os.environ["BENCH_REDIS_URL"] = redis_url
    await startup(pg, redis_url, report)
    if args.startup_only:
        return
    # The flood leaves a backlog of millions in the inbox: bus.max_length must hold it.
    settings = {
        "SESSIONS__MAX_PER_USER": "5000",
        "BUS__BATCH_SIZE": "1000",
        "BUS__MAX_LENGTH": "20000000",
    }
    async with bench_daemon(pg, redis_url, **settings) as d:
        pid = await idle_rss(d, report)
        steps: list[Callable[[], Awaitable[None]]] = [
            lambda: many_clients(d, pid, report),
            lambda: http_overload(d, pid, args.seconds, report),
            lambda: publish_overload(d, pid, args.seconds, report),
        ]
        for step in steps:
            await step()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--startup-only", action="store_true", help="only start to ready (three starts)"
    )
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    run_bench(
        "overload",
        args.json,
        lambda servers, report: run(servers.postgres_dsn, servers.redis_url, args, report),
    )


if __name__ == "__main__":
    main()
