"""The real `jarvisd run` on the repository's default (embedded) config, as a
separate process: start to ready, a server stopped by hand, signals, kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.servers import make_state_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


class DaemonProcess:
    """`python -m jarvisd run` on a copy of the repo's jarvisd.toml in its own folder."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        shutil.copy(REPO / "jarvisd.toml", folder / "jarvisd.toml")
        base = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
        base.pop("JOURNAL_STREAM", None)
        self.env = {
            **base,
            "JARVISD_HTTP__PORT": str(self.port),
            "JARVISD_DAEMON__HEALTH_INTERVAL": "0.2",
            **(env or {}),
        }
        self.log = open(folder / "daemon.log", "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jarvisd", "run"],
            cwd=folder,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> float:
        ok = wait(
            lambda: get(self.port, "/health/ready")[0] == 200 or self.proc.poll() is not None,
            timeout,
            0.05,
        )
        assert ok, f"not ready within {timeout}s:\n{self.output()}"
        assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.output()}"
        return time.monotonic() - self.started

    def stats(self) -> dict[str, Any]:
        status, body = get(self.port, "/stats")
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]

    def child_pids(self) -> list[int]:
        actors = self.stats()["actors"]
        return [actors[n]["pid"] for n in ("embedded-postgres", "embedded-valkey")]

    def output(self) -> str:
        self.log.flush()
        return (self.folder / "daemon.log").read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def instance() -> Iterator[Path]:
    folder = make_state_dir("jarvisd-proc-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_run_on_the_default_config_becomes_ready_and_sigterm_exits_0_leaving_nothing(
    instance: Path,
) -> None:
    d = DaemonProcess(instance)
    try:
        seconds = d.wait_ready(30)
        status, body = get(d.port, "/health/ready")
        assert status == 200
        doc = json.loads(body)
        assert doc["checks"]["postgres"][0]["status"] == "pass"
        assert doc["checks"]["redis"][0]["status"] == "pass"
        children = d.child_pids()
        assert all(alive(pid) for pid in children)
        assert (instance / "var" / "postgres" / "data" / "PG_VERSION").exists()
        print(f"start-to-ready {seconds:.2f}s")
        stop_started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0, d.output()
        print(f"SIGTERM-to-exit {time.monotonic() - stop_started:.2f}s")
        assert not any(alive(pid) for pid in children)
        assert not (instance / "var" / "jarvisd.sock").exists()
        assert '"event": "stopped"' in d.output()
    finally:
        d.stop()


def test_stopping_embedded_postgres_by_hand_turns_ready_503_then_back_to_200(
    instance: Path,
) -> None:
    d = DaemonProcess(instance)
    try:
        d.wait_ready(30)
        pg_pid = d.child_pids()[0]
        daemon_pid = d.proc.pid
        seen: list[tuple[int, int]] = []
        os.kill(pg_pid, signal.SIGINT)  # what `pg_ctl stop -m fast` does

        def observe() -> bool:
            seen.append((get(d.port, "/health/ready")[0], get(d.port, "/health/live")[0]))
            return seen[-1][0] == 503

        assert wait(observe, 10, 0.01), seen
        assert all(live == 200 for _ready, live in seen)
        d.wait_ready(30)
        assert d.proc.pid == daemon_pid
        assert d.proc.poll() is None
        # /stats is cached for a second: wait for a document from after the restart.
        assert wait(lambda: d.stats()["actors"]["embedded-postgres"]["restarts"] == 1, 5)
        actors = d.stats()["actors"]
        assert actors["embedded-postgres"]["pid"] != pg_pid
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
    finally:
        d.stop()


def test_kill_9_of_the_embedded_valkey_is_a_503_then_a_restarted_server_without_a_restart_of_ours(
    instance: Path,
) -> None:
    d = DaemonProcess(instance)
    try:
        d.wait_ready(30)
        token = (instance / "var" / "admin-token").read_text().strip()

        def cache_set(value: int) -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{d.port}/cache/set",
                data=json.dumps({"key": "k", "value": value}).encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 - http, ours
                    return int(resp.status)
            except urllib.error.HTTPError as err:
                return int(err.code)

        assert cache_set(1) == 200
        vk_pid = d.child_pids()[1]
        daemon_pid = d.proc.pid
        os.kill(vk_pid, signal.SIGKILL)
        assert wait(lambda: get(d.port, "/health/ready")[0] == 503, 10, 0.01)
        assert wait(lambda: cache_set(2) == 200, 30, 0.1), d.output()
        d.wait_ready(30)
        assert d.proc.pid == daemon_pid
        assert d.proc.poll() is None
        assert wait(lambda: d.stats()["actors"]["embedded-valkey"]["restarts"] == 1, 5)
        assert d.child_pids()[1] != vk_pid
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
    finally:
        d.stop()


def test_sigint_drains_and_exits_0_like_sigterm(instance: Path) -> None:
    d = DaemonProcess(instance)
    try:
        d.wait_ready(30)
        children = d.child_pids()
        d.proc.send_signal(signal.SIGINT)
        assert d.proc.wait(10) == 0
        assert not any(alive(pid) for pid in children)
    finally:
        d.stop()


def test_kill_9_of_the_daemon_leaves_no_server_running_and_the_next_start_works(
    instance: Path,
) -> None:
    d = DaemonProcess(instance)
    try:
        d.wait_ready(30)
        children = d.child_pids()
        d.proc.kill()
        d.proc.wait(10)
        assert wait(lambda: not any(alive(pid) for pid in children), 15), (
            "a server outlived its daemon"
        )
    finally:
        d.stop()
    again = DaemonProcess(instance)
    try:
        again.wait_ready(30)
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(10) == 0
    finally:
        again.stop()


def test_a_spent_restart_budget_exits_non_zero_and_stops_the_servers(instance: Path) -> None:
    d = DaemonProcess(instance, env={"JARVISD_SUPERVISOR__MAX_RESTARTS": "0"})
    try:
        d.wait_ready(30)
        pg_pid, valkey_pid = d.child_pids()
        os.kill(valkey_pid, signal.SIGKILL)
        assert d.proc.wait(15) == 1, d.output()
        assert "supervisor_escalation" in d.output()
        assert wait(lambda: not alive(pg_pid), 10)
    finally:
        d.stop()


def test_two_copies_of_the_config_in_two_folders_run_independently(instance: Path) -> None:
    other = make_state_dir("jarvisd-proc-")
    a, b = DaemonProcess(instance), DaemonProcess(other)
    try:
        a.wait_ready(30)
        b.wait_ready(30)
        assert set(a.child_pids()).isdisjoint(b.child_pids())
        for d in (a, b):
            d.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(10) == 0
        assert b.proc.wait(10) == 0
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(other, ignore_errors=True)


def test_a_broken_config_makes_run_exit_2_with_the_key_named(instance: Path) -> None:
    (instance / "jarvisd.toml").write_text("[postgres]\npool_maxx = 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "jarvisd", "run"],
        cwd=instance,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")},
    )
    assert proc.returncode == 2
    assert "postgres.pool_maxx" in proc.stderr


def test_migrate_applies_and_reports_on_the_embedded_database_without_a_daemon(
    instance: Path,
) -> None:
    shutil.copy(REPO / "jarvisd.toml", instance / "jarvisd.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}

    def jarvisd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "jarvisd", *args],
            cwd=instance,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )

    status = jarvisd("migrate", "--status")
    assert status.returncode == 0, status.stderr
    assert "pending  0001_base" in status.stdout
    assert "pending  0002_access_and_commands" in status.stdout
    applied = jarvisd("migrate")
    assert applied.returncode == 0, applied.stderr
    assert "applied 0001_base" in applied.stdout
    assert "applied 0002_access_and_commands" in applied.stdout
    again = jarvisd("migrate")
    assert again.stdout.strip() == "up to date"
    # nothing is left running after the command
    pid_file = instance / "var" / "postgres" / "data" / "postmaster.pid"
    assert not pid_file.exists()
