"""systemd integration: notify protocol, watchdog, reload, socket activation,
units (DESIGN §11). The notify tests read real datagrams off a real socket."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from config import Settings
from jarvisd.reload import plan_reload
from jarvisd.systemd import Notifier, Watchdog, listen_fds, watchdog_interval
from tests.conftest import free_port
from tests.servers import Servers, make_state_dir
from tests.test_daemon_process import DaemonProcess, alive, get, wait

REPO = Path(__file__).resolve().parent.parent


class Receiver:
    """A NOTIFY_SOCKET: a thread stamps each datagram on arrival and keeps
    it as a dict of its fields."""

    def __init__(self, path: Path | None = None, abstract: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract is not None:
            self.sock.bind("\0" + abstract)
            self.address = "@" + abstract
        else:
            assert path is not None
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def drain(self, settle: float = 0.1) -> list[dict[str, str]]:
        time.sleep(settle)
        with self._lock:
            return [m for _t, m in self.messages]

    def wait_for(self, predicate, timeout: float = 30.0) -> dict[str, str]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            with self._lock:
                fresh = self.messages[seen:]
                seen = len(self.messages)
            for _t, message in fresh:
                if predicate(message):
                    return message
            time.sleep(0.01)
        raise AssertionError(f"no matching notification; got {[m for _t, m in self.messages]}")

    def mark(self) -> int:
        with self._lock:
            return len(self.messages)

    def since(self, mark: int) -> list[dict[str, str]]:
        with self._lock:
            return [m for _t, m in self.messages[mark:]]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "notify.sock")
    yield r
    r.close()


# -- notifier -------------------------------------------------------------------------
def test_notifications_reach_a_path_socket_as_one_datagram(receiver: Receiver) -> None:
    n = Notifier({"NOTIFY_SOCKET": receiver.address})
    n.ready("ready: 4 actors")
    n.close()
    assert receiver.drain() == [{"READY": "1", "STATUS": "ready: 4 actors"}]


def test_notifications_reach_an_abstract_socket() -> None:
    r = Receiver(abstract=f"jarvisd-test-{os.getpid()}")
    try:
        n = Notifier({"NOTIFY_SOCKET": r.address})
        assert n.send("STATUS=ünïcode")
        n.close()
        assert r.drain() == [{"STATUS": "ünïcode"}]
    finally:
        r.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.send("READY=1")
    assert not n.watchdog()


def test_a_vanished_notify_socket_is_logged_not_raised(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not n.send("READY=1")
    n.close()


def test_reloading_carries_the_monotonic_clock(receiver: Receiver) -> None:
    n = Notifier({"NOTIFY_SOCKET": receiver.address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.close()
    (msg,) = receiver.drain()
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after


def test_watchdog_interval_is_half_the_usec_and_only_for_our_pid() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


async def test_the_watchdog_pings_and_a_blocked_loop_misses_pings(receiver: Receiver) -> None:
    n = Notifier({"NOTIFY_SOCKET": receiver.address})
    dog = Watchdog(n, 0.05, lambda: True)
    task = asyncio.create_task(dog.run())
    await asyncio.sleep(0.3)
    time.sleep(0.5)
    await asyncio.sleep(0.2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    n.close()
    receiver.drain()
    stamps = [t for t, m in list(receiver.messages) if m.get("WATCHDOG") == "1"]
    assert len(stamps) >= 6
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) >= 0.45  # no ping while the loop was blocked


async def test_the_watchdog_withholds_pings_when_the_supervisor_gave_up(receiver: Receiver) -> None:
    n = Notifier({"NOTIFY_SOCKET": receiver.address})
    dog = Watchdog(n, 0.02, lambda: False)
    task = asyncio.create_task(dog.run())
    await asyncio.sleep(0.15)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    n.close()
    assert receiver.drain() == []


def test_listen_fds_ignores_sockets_meant_for_another_process() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert listen_fds(env) == []
    assert "LISTEN_FDS" not in env  # unset, as sd_listen_fds(1) does


# -- reload planning -------------------------------------------------------------------
def test_reload_applies_live_keys_and_keeps_restart_keys() -> None:
    old = msgspec.convert({"embedded": {"enabled": True}}, Settings)
    new = msgspec.convert(
        {
            "embedded": {"enabled": True},
            "daemon": {"log_level": "debug"},
            "http": {"port": 9999},
            "approvals": {"threshold": 80},
            "postgres": {"pool_max": 3},
        },
        Settings,
    )
    plan = plan_reload(old, new)
    assert sorted(plan.applied) == ["approvals.threshold", "daemon.log_level"]
    assert sorted(plan.restart_needed) == ["http.port", "postgres.pool_max"]
    assert plan.settings.daemon.log_level == "debug"
    assert plan.settings.http.port == 8017
    assert plan.settings.postgres.pool_max == 10


# -- the daemon under a notify socket ----------------------------------------------------
@pytest.fixture
def instance() -> Iterator[Path]:
    folder = make_state_dir("jarvisd-sd-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_ready_status_watchdog_reload_and_stop_over_the_notify_socket(
    instance: Path, receiver: Receiver
) -> None:
    d = DaemonProcess(
        instance,
        env={
            "NOTIFY_SOCKET": receiver.address,
            "WATCHDOG_USEC": "400000",
            "JARVISD_DAEMON__DRAIN_GRACE": "1",
        },
    )
    try:
        assert receiver.wait_for(lambda m: m.get("STATUS") == "starting")
        ready = receiver.wait_for(lambda m: m.get("READY") == "1")
        assert ready["STATUS"].startswith(("ready", "degraded"))
        d.wait_ready(30)
        receiver.wait_for(lambda m: m.get("STATUS", "").startswith("ready: "))
        first = receiver.mark()
        time.sleep(1.0)
        pings = [m for m in receiver.since(first) if m.get("WATCHDOG") == "1"]
        assert len(pings) >= 3  # every 0.2 s

        # A valid reload: one live key, one that needs a restart.
        cfg = instance / "jarvisd.toml"
        original = cfg.read_text()
        cfg.write_text(
            original.replace('log_level = "info"', 'log_level = "debug"')
            + "\n[postgres]\npool_max = 3\n"
        )
        mark = receiver.mark()
        d.proc.send_signal(signal.SIGHUP)
        reloading = receiver.wait_for(lambda m: m.get("RELOADING") == "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert wait(lambda: any(m.get("READY") == "1" for m in receiver.since(mark)), 10)
        after = next(m for m in receiver.since(mark) if m.get("READY") == "1")
        assert receiver.since(mark).index(reloading) < receiver.since(mark).index(after)
        assert "restart needed for postgres.pool_max" in after["STATUS"]
        assert wait(lambda: '"event": "reloaded"' in d.output(), 5)
        assert '"applied": ["daemon.log_level"]' in d.output()

        # An invalid file on SIGHUP keeps the running configuration.
        cfg.write_text(original + "\n[postgres]\npool_maxx = 3\n")
        mark = receiver.mark()
        d.proc.send_signal(signal.SIGHUP)
        assert wait(
            lambda: any("reload rejected" in m.get("STATUS", "") for m in receiver.since(mark)), 10
        )
        rejected = next(m for m in receiver.since(mark) if "reload rejected" in m.get("STATUS", ""))
        assert rejected.get("READY") == "1"
        assert any(m.get("RELOADING") == "1" for m in receiver.since(mark))
        assert "reload rejected" in rejected["STATUS"]
        assert "postgres.pool_maxx" in rejected["STATUS"]
        assert get(d.port, "/health/ready")[0] == 200
        assert d.proc.poll() is None

        # SIGTERM: STOPPING=1, readiness 503 while draining, exit 0.
        children = d.child_pids()
        mark = receiver.mark()
        d.proc.send_signal(signal.SIGTERM)
        assert wait(lambda: any(m.get("STOPPING") == "1" for m in receiver.since(mark)), 5)
        stopping = next(m for m in receiver.since(mark) if m.get("STOPPING") == "1")
        assert stopping["STATUS"].startswith("draining")
        codes = []
        assert wait(lambda: codes.append(get(d.port, "/health/ready")[0]) or codes[-1] == 503, 5)
        assert get(d.port, "/health/live")[0] == 200
        assert d.proc.wait(10) == 0
        assert not any(alive(pid) for pid in children)
    finally:
        d.stop()


@pytest.mark.slow
def test_no_watchdog_pings_when_watchdog_pid_names_another_process(
    instance: Path, receiver: Receiver
) -> None:
    d = DaemonProcess(
        instance,
        env={"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"},
    )
    try:
        receiver.wait_for(lambda m: m.get("READY") == "1")
        time.sleep(0.6)
        assert not any(m.get("WATCHDOG") for m in receiver.drain())
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
    finally:
        d.stop()


# -- socket activation ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate"
)
def test_socket_activation_serves_health_on_a_tcp_and_a_unix_listener(
    servers: Servers, pg_dsn: str, tmp_path: Path
) -> None:
    port = free_port()
    unix_path = tmp_path / "activated.sock"
    daemon_env = {
        "JARVISD_POSTGRES__DSN": pg_dsn,
        "JARVISD_REDIS__URL": servers.redis_url,
        "JARVISD_DAEMON__STATE_DIR": str(tmp_path / "state"),
        # Deliberately not the activated port: passed sockets win over http.port.
        "JARVISD_HTTP__PORT": str(free_port()),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            "-l",
            str(unix_path),
            "--fdname=http:http",
            *(f"-E{k}={v}" for k, v in daemon_env.items()),
            sys.executable,
            "-m",
            "jarvisd",
            "run",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait(lambda: unix_path.exists(), 10)
        status, _body = get(port, "/health/live")  # this connection starts the daemon
        if status != 200:
            assert wait(lambda: get(port, "/health/live")[0] == 200, 30), (
                tmp_path / "daemon.log"
            ).read_text()
        assert wait(lambda: get(port, "/health/ready")[0] == 200, 30)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(str(unix_path))
        client.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := client.recv(4096):
            reply += chunk
        client.close()
        assert reply.startswith(b"HTTP/1.1 200")
        # The host's CLI finds the passed sockets from the daemon's instance
        # file, though its configuration names another socket and port.
        cli_env = {
            **env,
            **daemon_env,
            "JARVISD_HTTP__UNIX_SOCKET": str(tmp_path / "configured-but-unused.sock"),
        }
        for command in (["health"], ["approvals", "list", "-q"]):
            found = subprocess.run(
                [sys.executable, "-m", "jarvisd", *command],
                cwd=tmp_path,
                env=cli_env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert found.returncode == 0, found.stdout + found.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        text = (tmp_path / "daemon.log").read_text()
        assert f"http=tcp:127.0.0.1:{port}" in text
        assert f"http=unix:{unix_path}" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()


# -- the units -------------------------------------------------------------------------------
def units_with_real_exec(tmp_path: Path) -> Path:
    jarvisd = shutil.which("jarvisd") or str(Path(sys.executable).parent / "jarvisd")
    service = (REPO / "systemd" / "jarvisd.service").read_text()
    (tmp_path / "jarvisd.service").write_text(
        service.replace("/opt/jarvisd/venv/bin/jarvisd", jarvisd)
    )
    shutil.copy(REPO / "systemd" / "jarvisd.socket", tmp_path / "jarvisd.socket")
    return tmp_path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_units_pass_systemd_analyze_verify_silently(tmp_path: Path) -> None:
    folder = units_with_real_exec(tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "jarvisd.service", "jarvisd.socket"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout + proc.stderr == ""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_service_scores_what_its_comment_says_in_systemd_analyze_security(
    tmp_path: Path,
) -> None:
    folder = units_with_real_exec(tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "jarvisd.service"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    line = next(x for x in proc.stdout.splitlines() if "Overall exposure level" in x)
    score = float(line.split(":")[1].split()[0])
    assert score <= 1.2, line
    comment = (REPO / "systemd" / "jarvisd.service").read_text()
    assert f"a sandbox scoring {score:.1f}" in comment, line


def test_the_units_the_example_config_and_the_readme_agree() -> None:
    """Where the unit keeps state and sockets is where the example config
    and the install notes say, and the socket unit's path outlives the
    service's runtime directory."""
    import tomllib

    service = (REPO / "systemd" / "jarvisd.service").read_text()
    socket_unit = (REPO / "systemd" / "jarvisd.socket").read_text()
    config = tomllib.loads((REPO / "config" / "examples" / "systemd.toml").read_text())
    operations = (REPO / "docs" / "operations.md").read_text()

    def value(unit: str, key: str) -> list[str]:
        return [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith(f"{key}=")]

    (state,) = value(service, "StateDirectory")
    (runtime,) = value(service, "RuntimeDirectory")
    assert config["daemon"]["state_dir"] == f"/var/lib/{state}"
    assert Path(config["http"]["unix_socket"]).parent == Path(f"/run/{runtime}")
    listened = [v for v in value(socket_unit, "ListenStream") if v.startswith("/")]
    assert listened
    assert all(not v.startswith(f"/run/{runtime}/") for v in listened)
    assert "--config /etc/jarvisd/jarvisd.toml" in service
    for where in (f"/var/lib/{state}/admin-token", config["http"]["unix_socket"], *listened):
        assert where in operations, where
    assert "/opt/jarvisd/venv/bin/jarvisd" in operations
