"""A PostgreSQL primary and a streaming standby on loopback ports, for the
failover tests: the binaries of the embedded extra (or the system's), run as
an unprivileged user when the tests run as root, each server with a
parent-death signal. The primary waits for the standby on every commit
(``synchronous_standby_names``), so what it acknowledged survives its loss.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from actors.embedded.account import EMBEDDED_ACCOUNT, RunAs
from actors.embedded.binaries import find_postgres_bin_dir
from actors.embedded.homes import ensure_reachable, make_private_dir, reachable_install
from actors.embedded.postgres import install_layout
from tests.cluster import _pdeathsig, free_cluster_ports, stop_all
from tests.servers import make_state_dir

USER = "jarvisd"


@dataclass
class PgPair:
    root: Path
    bin_dir: Path
    run_as: RunAs
    ports: list[int]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return f"postgresql://{USER}@{hosts}/postgres?target_session_attrs=read-write"

    def dsn_of(self, name: str) -> str:
        port = self.ports[0 if name == "primary" else 1]
        return f"postgresql://{USER}@127.0.0.1:{port}/postgres"

    @classmethod
    def start(cls) -> PgPair:
        run_as = RunAs.resolve(EMBEDDED_ACCOUNT)
        found = find_postgres_bin_dir()
        bin_dir = reachable_install(found / "postgres", run_as, **install_layout(found)).parent
        ensure_reachable(bin_dir / "postgres", run_as)
        root = make_state_dir("jarvisd-pg-pair-")
        ensure_reachable(root, run_as)
        pair = cls(root, bin_dir, run_as, free_cluster_ports(2))
        try:
            for name in ("primary", "standby", "sockets"):
                make_private_dir(root / name, run_as)
            pair._tool("initdb", "-D", str(root / "primary"), "-U", USER, "--auth=trust", "-E",
                       "UTF8", "--locale=C", "--no-instructions")  # fmt: skip
            pair._serve("primary", "synchronous_standby_names=*")
            pair._tool("pg_basebackup", "-h", "127.0.0.1", "-p", str(pair.ports[0]), "-U", USER,
                       "-D", str(root / "standby"), "-R", "-X", "stream")  # fmt: skip
            pair._serve("standby")
        except BaseException:
            pair.stop()
            raise
        return pair

    def _tool(self, tool: str, *args: str) -> None:
        subprocess.run(
            [str(self.bin_dir / tool), *args],
            check=True,
            capture_output=True,
            timeout=120,
            cwd=self.root,
            **self.run_as.subprocess_kwargs(),
        )

    def _serve(self, name: str, *options: str) -> None:
        port = self.ports[0 if name == "primary" else 1]
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.root / name), "-p", str(port),
                "-k", str(self.root / "sockets"), "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off", "-c", "full_page_writes=off"]  # fmt: skip
        for option in options:
            argv += ["-c", option]
        log = (self.root / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            argv,
            cwd=self.root,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            preexec_fn=_pdeathsig,
            start_new_session=True,
            **self.run_as.subprocess_kwargs(),
        )
        log.close()
        deadline = time.monotonic() + 30
        ready = [str(self.bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
        while subprocess.run(ready, check=False, timeout=10).returncode != 0:
            if time.monotonic() > deadline or self.procs[name].poll() is not None:
                log_text = (self.root / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"PostgreSQL {name} did not start:\n{log_text}")
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        """kill -9 of one server."""
        proc = self.procs[name]
        proc.kill()
        proc.wait(10)

    async def promote(self) -> None:
        conn = await asyncpg.connect(self.dsn_of("standby"), timeout=5)
        try:
            await conn.execute("SELECT pg_promote(true, 30)")
        finally:
            await conn.close()

    def stop(self) -> None:
        stop_all(self.procs.values(), signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(self.root, ignore_errors=True)
