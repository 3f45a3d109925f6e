"""A lifecycle that never surprises: one daemon per state directory, ready
only once its first admin can log in, and nothing left behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from config import LoadedConfig
from jarvisd.daemon import Daemon
from jarvisd.instance import InstanceLock, InstanceLocked
from tests.conftest import free_port
from tests.servers import make_state_dir
from tests.test_daemon_process import REPO, DaemonProcess, get, wait
from tests.test_http import Running

# The persistence actor's lock around the first admin (actors/persistence/users.py).
BOOTSTRAP_LOCK = int.from_bytes(hashlib.sha256(b"jarvisd.bootstrap-admin").digest()[:8], "big") >> 1


def test_the_instance_lock_names_who_holds_it_and_goes_with_its_process(tmp_path: Path) -> None:
    held = InstanceLock.take(tmp_path)
    held.record(["http://127.0.0.1:8017"])
    with pytest.raises(InstanceLocked, match=rf"pid {os.getpid()}, listening on http://127"):
        InstanceLock.take(tmp_path)
    held.release()
    InstanceLock.take(tmp_path).release()  # free again
    # A holder that died (kill -9): the kernel lets the lock go with the process.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from jarvisd.instance import "
            "InstanceLock; InstanceLock.take(Path(sys.argv[1])); print('held', flush=True); "
            "time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"held\n"
        with pytest.raises(InstanceLocked, match=f"pid {child.pid}"):
            InstanceLock.take(tmp_path)
    finally:
        child.kill()
        child.wait(10)
        assert child.stdout is not None
        child.stdout.close()
    InstanceLock.take(tmp_path).release()


async def test_readiness_waits_until_the_first_admins_token_is_written(
    make_config: Callable[..., LoadedConfig], pg_dsn: str
) -> None:
    """The README's next command reads the token right after readiness: it
    must be there at the first 200."""
    blocker = await asyncpg.connect(pg_dsn)
    await blocker.execute("SELECT pg_advisory_lock($1)", BOOTSTRAP_LOCK)  # the admin waits
    daemon = Daemon(make_config())
    token = Path(daemon.settings.daemon.state_dir) / "admin-token"
    task = asyncio.create_task(daemon.run(handle_signals=False))
    try:
        async with asyncio.timeout(30):
            await daemon.ready.wait()
        async with aiohttp.ClientSession() as session:
            running = Running(daemon, task, session)
            for _ in range(20):  # a second of readiness checks: not ready, no token
                status, _c, _b = await running.get("/health/ready")
                assert status == 503
                assert not token.exists()
                await asyncio.sleep(0.05)
            _s, doc = await running.json("/health/ready")
            assert doc["checks"]["postgres"][0]["output"].startswith("starting")
            await blocker.execute("SELECT pg_advisory_unlock($1)", BOOTSTRAP_LOCK)
            async with asyncio.timeout(20):
                while (await running.get("/health/ready"))[0] != 200:
                    await asyncio.sleep(0.01)
            assert token.exists(), "ready before the admin's token was written"
            assert token.stat().st_mode & 0o777 == 0o600
    finally:
        await blocker.close()
        daemon.request_stop("test")
        assert await asyncio.wait_for(task, 20) == 0


@pytest.fixture
def instance() -> Iterator[Path]:
    folder = make_state_dir("jarvisd-twice-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_second_run_on_the_same_state_directory_exits_1_and_leaves_the_first_untouched(
    instance: Path,
) -> None:
    first = DaemonProcess(instance)
    try:
        first.wait_ready(60)
        servers = first.child_pids()
        env = {**first.env, "JARVISD_HTTP__PORT": str(free_port())}
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "jarvisd", "run"],
            cwd=instance,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
        out = second.stdout + second.stderr
        assert second.returncode == 1, out
        assert f"pid {first.proc.pid}" in out, out
        assert f"http://127.0.0.1:{first.port}" in out, out
        assert "orphan" not in out
        assert took < 15, took
        # The first goes on as it was: the same servers, ready, nothing restarted.
        assert first.proc.poll() is None
        assert first.child_pids() == servers
        assert get(first.port, "/health/ready")[0] == 200
        actors = first.stats()["actors"]
        assert sum(a["restarts"] for a in actors.values()) == 0
    finally:
        first.proc.terminate()
        assert wait(lambda: first.proc.poll() is not None, 30)
        first.stop()


def test_on_a_terminal_ready_comes_after_the_admin_and_a_banner_says_what_next(
    instance: Path, pg_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    """The log says `ready` only once the database answered and the admin's
    token is written; on a terminal a banner names the API, the token file
    and how to stop."""
    import json
    import pty
    import select
    import signal

    from tests.test_bus_process import shared_env

    shutil.copy(REPO / "jarvisd.toml", instance / "jarvisd.toml")
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    env = {**base, **shared_env(pg_dsn, redis_url, redis_prefix), "JARVISD_HTTP__PORT": str(port)}
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jarvisd", "run"],
        cwd=instance,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"stop     Ctrl-C" not in seen and time.monotonic() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                try:
                    seen += os.read(main, 65536)
                except OSError:  # the child closed the terminal
                    break
        text = seen.decode(errors="replace").replace("\r\n", "\n")
        assert "stop     Ctrl-C" in text, text
        events = [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]
        assert events.index("listening") < events.index("admin_created") < events.index("ready")
        assert events.index("postgres_ready") < events.index("ready")
        assert (instance / "var/admin-token").exists()  # before the banner names it
        assert f"  API      http://127.0.0.1:{port}" in text
        assert "  token    ./var/admin-token" in text
        assert "approvals list  (the local admin, on ./var/jarvisd.sock)" in text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        os.close(main)
