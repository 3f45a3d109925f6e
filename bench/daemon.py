"""A real `jarvisd run` for benchmarks: its own database on the bench
PostgreSQL, its own key prefix on the bench Redis, stopped afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg

from bench.report import Report
from tests.servers import Servers, dsn_with_database, unlink_prefix

__all__ = ["BenchDaemon", "bench_daemon", "run_bench"]


def run_bench(
    name: str,
    json_path: str | None,
    run: Callable[[Servers, Report], Coroutine[Any, Any, None]],
    *,
    redis: bool = True,
) -> None:
    """A benchmark's main: the servers (JARVISD_TEST_* external ones, else
    embedded ones), ``run`` on them, the servers stopped, and the figures
    written to ``json_path`` when one is given (even after a failure)."""
    servers = Servers.start(redis=redis)
    report = Report(name)
    try:
        where = f", Redis at {servers.redis_url}" if redis else ""
        print(f"(PostgreSQL at {servers.postgres_dsn}{where})")
        asyncio.run(run(servers, report))
    finally:
        servers.stop()
        if json_path:
            report.write(json_path)


@dataclass
class BenchDaemon:
    base: str
    port: int
    token: str
    prefix: str
    stream: str
    dsn: str
    folder: str
    pid: int = 0


@asynccontextmanager
async def bench_daemon(
    pg_admin_dsn: str, redis_url: str, **settings: str
) -> AsyncIterator[BenchDaemon]:
    """Start it with ``settings`` as JARVISD_* overrides (e.g. BUS__BATCH_SIZE="1000")."""
    name = f"jarvisd_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    folder = tempfile.mkdtemp(prefix="jarvisd-bench-")
    port = 18000 + os.getpid() % 1000
    prefix = f"bench:{uuid.uuid4().hex[:6]}:"
    dsn = dsn_with_database(pg_admin_dsn, name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    env.update(
        JARVISD_POSTGRES__DSN=dsn,
        JARVISD_REDIS__URL=redis_url,
        JARVISD_REDIS__PREFIX=prefix,
        JARVISD_BUS__STREAM=f"{prefix}inbox",
        # The shared inbox: one stream, read as an agent's own inbox is (the
        # same XREADGROUP); the producers write it as the daemon's own user.
        JARVISD_BUS__SHARED_INBOX="true",
        # The fan-out benchmark's channels pass through (pubsub.channels).
        JARVISD_PUBSUB__CHANNELS='["user_activity", "bench-*"]',
        JARVISD_DAEMON__STATE_DIR=folder,
        JARVISD_HTTP__PORT=str(port),
        JARVISD_DAEMON__LOG_LEVEL="warning",
        **{f"JARVISD_{k}": v for k, v in settings.items()},
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - once, at bench start
        [sys.executable, "-m", "jarvisd", "run"],
        env=env,
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    token_file = os.path.join(folder, "admin-token")
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(token_file):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the daemon did not come up")
            await asyncio.sleep(0.1)
        with open(token_file) as fh:  # noqa: ASYNC230 - a few bytes, once
            token = fh.read().strip()
        # Measured from ready on, as an operator's traffic would be.
        async with aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/health/ready") as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the daemon did not become ready")
                await asyncio.sleep(0.05)
        yield BenchDaemon(
            base=f"http://127.0.0.1:{port}",
            port=port,
            token=token,
            prefix=prefix,
            stream=f"{prefix}inbox",
            dsn=dsn,
            folder=folder,
            pid=proc.pid,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
            await unlink_prefix(redis_url, prefix)
