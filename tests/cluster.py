"""A real local Redis Cluster for the tests: 3 primaries + 3 replicas.

The nodes are valkey-server (or redis-server) processes in cluster mode on
free loopback ports, joined with ``valkey-cli --cluster create``. Each node
gets a parent-death signal, so a test process killed outright leaves none
behind; ``stop`` ends them in order. A short node timeout makes a replica
take over a killed primary within a few seconds.

``JARVISD_TEST_REDIS_CLUSTER_URL`` (``redis+cluster://h:p,h:p``) names an
external cluster instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from actors.embedded.binaries import find_valkey_cli, find_valkey_server

NODE_TIMEOUT_MS = 1000


def _pdeathsig() -> None:  # runs in the forked child, before exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """Ports whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 55000 and port not in ports and _port_free(port + 10000):
            ports.append(port)
    return ports


def stop_all(procs: Iterable[subprocess.Popen[bytes]], sig: int, timeout: float = 15) -> None:
    """Signal every running server, then wait for each; kill what lingers."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


@dataclass
class LocalCluster:
    directory: Path
    ports: list[int]
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    @classmethod
    def start(cls, primaries: int = 3, replicas: int = 1) -> LocalCluster:
        directory = Path(tempfile.mkdtemp(prefix="jarvisd-cluster-"))
        cluster = cls(directory, free_cluster_ports(primaries * (1 + replicas)))
        try:
            for port in cluster.ports:
                cluster.start_node(port)
            cli = find_valkey_cli()
            if cli is None:
                raise RuntimeError("valkey-cli (or redis-cli) is needed to create a cluster")
            subprocess.run(
                [
                    str(cli),
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in cluster.ports),
                    "--cluster-replicas",
                    str(replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            cluster.wait_healthy()
            cluster.wait_replicated()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def start_node(self, port: int) -> None:
        node_dir = self.directory / str(port)
        node_dir.mkdir(exist_ok=True)
        argv = [
            str(find_valkey_server()),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(node_dir),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            # A replica may always take over, however long its primary was away.
            "--cluster-replica-validity-factor",
            "0",
            "--appendonly",
            "no",
            "--save",
            "",
            "--logfile",
            str(node_dir / "server.log"),
        ]
        self.procs[port] = subprocess.Popen(
            argv, preexec_fn=_pdeathsig, start_new_session=True, stdin=subprocess.DEVNULL
        )
        proc = self.procs[port]

        def answers() -> bool:
            if proc.poll() is not None:
                log = (node_dir / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"node {port} exited with {proc.returncode}:\n{log}")
            with self.client(port) as c:
                return bool(c.ping())

        self._wait(answers, f"node {port} to answer")

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)

    def _wait(self, probe: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                if probe():
                    return
            except (OSError, redis.RedisError) as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"waited {timeout:g} s for {what} (last error: {last!r})")

    def _state(self, port: int) -> dict[str, str]:
        with self.client(port) as c:
            text = c.execute_command("CLUSTER", "INFO")
        text = text.decode() if isinstance(text, bytes) else str(text)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def _links_up(self, port: int) -> int:
        """How many other nodes ``port`` has a connected link to."""
        with self.client(port) as c:
            text = c.execute_command("CLUSTER", "NODES")
        text = text.decode() if isinstance(text, bytes) else str(text)
        up = 0
        for line in text.splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            if "myself" in flags or not {"fail", "fail?", "handshake", "noaddr"}.isdisjoint(flags):
                continue
            up += fields[7] == "connected"
        return up

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every running node sees a whole cluster in state ok, with its links
        to every other running node up (a PUBLISH reaches the other nodes over
        those links: one still being set up would drop it)."""

        def ok() -> bool:
            for port in self.alive():
                info = self._state(port)
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                    return False
                if self._links_up(port) < len(self.alive()) - 1:
                    return False
            return True

        self._wait(ok, "the cluster to be ok", timeout)

    def wait_replicated(self, timeout: float = 30.0) -> None:
        """Every running primary has an online replica (its first sync done)."""

        def online() -> bool:
            for port in self.primaries():
                with self.client(port) as c:
                    info: Any = c.info("replication")
                if not any(
                    isinstance(v, dict) and v.get("state") == "online"
                    for k, v in info.items()
                    if k.startswith("slave")
                ):
                    return False
            return True

        self._wait(online, "every primary to have an online replica", timeout)

    def primaries(self) -> list[int]:
        """Ports of the running primaries, as the cluster sees them now."""
        port = self.alive()[0]
        with self.client(port) as c:
            text = c.execute_command("CLUSTER", "NODES")
        text = text.decode() if isinstance(text, bytes) else str(text)
        out = []
        for line in text.splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2] and fields[7] == "connected":
                out.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(p for p in out if p in self.alive())

    def node_id(self, port: int) -> str:
        with self.client(port) as c:
            made = c.execute_command("CLUSTER", "MYID")
        return made.decode() if isinstance(made, bytes) else str(made)

    def slots_of(self, port: int) -> list[int]:
        """The slots the primary on ``port`` serves now."""
        with self.client(self.alive()[0]) as c:
            ranges: Any = c.execute_command("CLUSTER", "SLOTS")
        out: list[int] = []
        for first, last, primary, *_replicas in ranges:
            if int(primary[1]) == port:
                out += range(int(first), int(last) + 1)
        return sorted(out)

    def primary_of_slot(self, slot: int) -> int:
        """The port of the primary serving ``slot`` now."""
        with self.client(self.alive()[0]) as c:
            ranges: Any = c.execute_command("CLUSTER", "SLOTS")
        for first, last, primary, *_replicas in ranges:
            if int(first) <= slot <= int(last):
                return int(primary[1])
        raise LookupError(f"slot {slot} is not served")

    def kill(self, port: int) -> None:
        """kill -9 of one node."""
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)

    def wait_failover(self, dead: int, timeout: float = 30.0) -> None:
        """Until a replica has replaced the dead primary and the cluster is ok."""
        self._wait(
            lambda: dead not in self.primaries() and len(self.primaries()) == 3, "failover", timeout
        )
        self.wait_healthy(timeout)

    def stop(self) -> None:
        stop_all(self.procs.values(), signal.SIGTERM)
        shutil.rmtree(self.directory, ignore_errors=True)
