"""Health, stats and metrics over HTTP, on an in-process daemon (DESIGN §8)."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import pytest

from config import LoadedConfig
from jarvisd.daemon import Daemon

METRIC_LINE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? -?[0-9.e+Inf-]+$'
)


class Running:
    def __init__(
        self, daemon: Daemon, task: asyncio.Task[int], session: aiohttp.ClientSession
    ) -> None:
        self.daemon = daemon
        self.task = task
        self.session = session
        self.base = f"http://127.0.0.1:{daemon.http.bound_port}"

    async def get(self, path: str) -> tuple[int, str, str]:
        async with self.session.get(self.base + path) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.text()

    async def json(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.base + path) as resp:
            return resp.status, await resp.json(content_type=None)

    async def wait_ready(self, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while (await self.get("/health/ready"))[0] != 200:
                await asyncio.sleep(0.01)


async def start_daemon(loaded: LoadedConfig) -> AsyncGenerator[Running, None]:
    daemon = Daemon(loaded)
    task = asyncio.create_task(daemon.run(handle_signals=False))
    async with asyncio.timeout(30):
        await asyncio.wait(
            {task, asyncio.create_task(daemon.ready.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
    assert daemon.ready.is_set(), f"daemon exited with {task.result()}"
    async with aiohttp.ClientSession() as session:
        running = Running(daemon, task, session)
        try:
            yield running
        finally:
            daemon.request_stop("test")
            code = await asyncio.wait_for(task, 15)
            assert code == 0


@pytest.fixture
async def running(make_config: Callable[..., LoadedConfig]) -> AsyncIterator[Running]:
    async for r in start_daemon(make_config()):
        yield r


async def test_live_answers_from_the_process_alone(running: Running) -> None:
    status, ctype, body = await running.get("/health/live")
    assert status == 200
    assert ctype == "application/health+json"
    assert '"status":"pass"' in body


async def test_ready_passes_with_postgres_and_redis_checks(running: Running) -> None:
    await running.wait_ready()
    status, doc = await running.json("/health/ready")
    assert status == 200
    assert doc["status"] == "pass"
    assert doc["checks"]["postgres"][0]["status"] == "pass"
    assert doc["checks"]["postgres"][0]["observedUnit"] == "ms"
    assert doc["checks"]["redis"][0]["status"] == "pass"
    assert {e["componentId"] for e in doc["checks"]["mailboxes"]} == {
        "persistence",
        "redis",
        "cache",
        "sessions",
        "logins",
        "pubsub",
        "pubsub-clients",
        "relay",
        "webhooks",
        "approvals",
        "bus",
        "http",
    }
    assert (await running.json("/health"))[1]["checks"].keys() == doc["checks"].keys()


async def test_ready_verbose_is_plain_text_lines(running: Running) -> None:
    await running.wait_ready()
    status, ctype, body = await running.get("/health/ready?verbose")
    assert status == 200
    assert ctype.startswith("text/plain")
    assert "[+]postgres ok" in body.splitlines()
    assert body.rstrip().endswith("ready: pass")


async def test_unknown_query_parameters_get_400_problem_json(running: Running) -> None:
    status, ctype, body = await running.get("/health/ready?verbos=1")
    assert status == 400
    assert ctype == "application/problem+json"
    assert "verbos" in body


async def test_unknown_paths_and_methods_get_problem_json(running: Running) -> None:
    status, ctype, _ = await running.get("/nope")
    assert (status, ctype) == (404, "application/problem+json")
    async with running.session.post(running.base + "/health/live") as resp:
        assert resp.status == 405
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert "GET" in resp.headers["Allow"]


async def test_stats_reports_uptime_and_each_actor(running: Running) -> None:
    # Until PostgreSQL answers, start-up work (the sweeper, the first admin)
    # may wait in the persistence mailbox: idle means once ready.
    await running.wait_ready()
    async with asyncio.timeout(5):
        while True:
            status, doc = await running.json("/stats")
            assert status == 200
            if doc["actors"]["persistence"]["mailbox"]["depth"] == 0:
                break
            await asyncio.sleep(0.05)
    assert doc["uptimeSeconds"] > 0
    assert doc["actors"]["persistence"]["state"] == "running"
    assert doc["actors"]["persistence"]["mailbox"] == {"depth": 0, "size": 1000}
    assert doc["restartsTotal"] == 0


async def test_metrics_are_valid_prometheus_text(running: Running) -> None:
    await running.wait_ready()
    for _ in range(3):
        await running.get("/health/live")
    status, ctype, body = await running.get("/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    samples = [line for line in body.splitlines() if line and not line.startswith("#")]
    bad = [line for line in samples if not METRIC_LINE.match(line)]
    assert bad == []
    assert 'jarvisd_actor_mailbox_depth{actor="persistence"} 0' in samples
    assert 'jarvisd_actor_restarts_total{actor="redis"} 0' in samples
    assert (
        'jarvisd_http_requests_total{method="GET",route="/health/live",status="200"} 3' in samples
    )
    assert any(s.startswith("process_resident_memory_bytes ") for s in samples)
    assert 'jarvisd_health_check_up{check="postgres"} 1' in samples
    buckets = [
        s
        for s in samples
        if s.startswith('jarvisd_http_request_duration_seconds_bucket{route="/health/live"')
    ]
    counts = [int(b.rsplit(" ", 1)[1]) for b in buckets]
    assert counts == sorted(counts)
    assert buckets[-1].startswith(
        'jarvisd_http_request_duration_seconds_bucket{route="/health/live",le="+Inf"} 3'
    )
    # Every family is declared once.
    types = [line.split()[2] for line in body.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))


async def test_the_unix_socket_serves_the_same_api(running: Running) -> None:
    path = running.daemon.settings.http.unix_socket
    assert path is not None
    connector = aiohttp.UnixConnector(path=path)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get("http://localhost/health/live") as resp,
    ):
        assert resp.status == 200


async def test_a_draining_daemon_is_not_ready_but_still_live(running: Running) -> None:
    await running.wait_ready()
    running.daemon.runtime.draining = True
    status, doc = await running.json("/health/ready")
    assert status == 503
    assert doc["checks"]["daemon"][0]["output"].startswith("draining")
    assert (await running.get("/health/live"))[0] == 200
    status, _ctype, body = await running.get("/redis/stats")
    assert status == 503
    assert "shutting down" in body


async def test_redis_stats_reports_the_server(running: Running) -> None:
    status, doc = await running.json("/redis/stats")
    assert status == 200
    assert doc["version"]
    status, doc = await running.json("/redis/health")
    assert status == 200


async def test_redis_down_makes_ready_503_while_live_stays_200(
    make_config: Callable[..., LoadedConfig],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    loaded = make_config(redis={"url": dead, "connect_timeout": 0.3})
    async for r in start_daemon(loaded):
        async with asyncio.timeout(10):
            while True:
                status, doc = await r.json("/health/ready")
                if doc["checks"]["redis"][0]["status"] == "fail":
                    break
                await asyncio.sleep(0.05)
        assert status == 503
        assert "unreachable" in doc["checks"]["redis"][0]["output"]
        assert (await r.get("/health/live"))[0] == 200
        _s, _c, text = await r.get("/health/ready?verbose")
        assert "[-]redis fail" in text
        status, _c, body = await r.get("/redis/stats")
        assert status == 503
        assert "unreachable" in body


async def test_the_health_command_exits_0_when_ready_and_1_when_not(
    running: Running, tmp_path: Path
) -> None:
    await running.wait_ready()
    cfg = tmp_path / "probe.toml"
    cfg.write_text(f"[http]\nport = {running.daemon.http.bound_port}\n[embedded]\nenabled = true\n")
    ok = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "jarvisd", "health", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    assert "ready: pass" in ok.stdout
    running.daemon.runtime.draining = True
    not_ready = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "jarvisd", "health", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert not_ready.returncode == 1


def test_the_health_command_exits_1_when_no_daemon_answers(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "probe.toml"
    cfg.write_text(f"[http]\nport = {port}\n[embedded]\nenabled = true\n")
    proc = subprocess.run(
        [sys.executable, "-m", "jarvisd", "health", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert f"no daemon answers on http://127.0.0.1:{port}" in proc.stderr


async def test_a_port_in_use_is_a_clear_start_failure(
    make_config: Callable[..., LoadedConfig],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        loaded = make_config(http={"port": s.getsockname()[1]})
        code = await asyncio.wait_for(Daemon(loaded).run(handle_signals=False), 30)
    assert code == 1


async def test_secrets_never_appear_in_stats_metrics_health_or_logs(
    make_config: Callable[..., LoadedConfig], pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The embedded server's DSN holds its password; an external one (trust
    # authentication ignores the password) is given one to look for.
    user, rest = pg_dsn.split("://", 1)[1].split("@", 1)
    name, _, password = user.partition(":")
    secret = unquote(password) if password else "s3cr3t-pw"
    secret_dsn = f"postgresql://{name}:{quote(secret, safe='')}@{rest}"
    async for r in start_daemon(make_config(postgres={"dsn": secret_dsn})):
        await r.wait_ready()
        for path in (
            "/stats",
            "/metrics",
            "/health/ready",
            "/health/ready?verbose",
            "/redis/stats",
        ):
            _status, _ctype, body = await r.get(path)
            assert secret not in body, path
    assert secret not in capsys.readouterr().out
