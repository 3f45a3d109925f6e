"""Embedded Valkey: a supervised child on a Unix socket only, with an
append-only file. Nobody is let in without credentials: the default user is
off; the daemon is the ACL user ``jarvisd`` (its password in
``state_dir/secrets/valkey-password``), and each agent a user of its own
that the bus creates (``actors.agents``), kept in the server's ACL file."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

from actors.embedded.account import RunAs
from actors.embedded.binaries import find_valkey_server
from actors.embedded.child import ChildServer, adopt, pid_alive, secret, write_private
from actors.embedded.homes import (
    embedded_home,
    ensure_reachable,
    make_private_dir,
    prepare_home,
    reachable_install,
    runtime_dir,
)

__all__ = ["DAEMON_USER", "EmbeddedValkey"]

DAEMON_USER = "jarvisd"  # the daemon's own Valkey user: every key, channel and command


class EmbeddedValkey(ChildServer):
    # SIGTERM makes Valkey flush the append-only file and exit cleanly.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    server_name: ClassVar[str] = "valkey"

    def __init__(
        self,
        state_dir: Path,
        *,
        run_as: RunAs,
        binary: str | None = None,
        start_timeout: float = 30.0,
        appendonly: bool = True,
        max_memory: str = "1gb",
        max_value: str = "1mb",
        name: str = "embedded-valkey",
    ) -> None:
        super().__init__(name, state_dir, run_as, start_timeout=start_timeout)
        self.binary_override = binary
        self.appendonly = appendonly
        # Agents write to this server: no one value, and not all of them
        # together, may take the host's memory (writes past it are refused).
        self.max_memory = max_memory
        self.max_value = max_value
        self.root = embedded_home(state_dir, run_as) / "valkey"
        self.socket_dir = runtime_dir(state_dir, run_as) / "valkey"
        self.socket_path = self.socket_dir / "valkey.sock"
        self.pid_file = self.root / "valkey.pid"
        self.acl_file = self.root / "users.acl"
        self._password: str | None = None

    @property
    def password(self) -> str:
        if self._password is None:
            self._password = secret(self.state_dir, "valkey-password")
        return self._password

    @property
    def url(self) -> str:
        return f"unix://{DAEMON_USER}:{quote(self.password, safe='')}@{self.socket_path}"

    def _write_acl_file(self) -> None:
        """The users Valkey starts with: none but the daemon. (The agents'
        users follow from PostgreSQL; the bus applies them as it connects.)"""
        digest = hashlib.sha256(self.password.encode()).hexdigest()
        lines = ["user default off", f"user {DAEMON_USER} on #{digest} ~* &* +@all"]
        # The agents' users the last ACL SAVE kept: they work from the start
        # (the bus applies them again, and removes any it no longer knows).
        with contextlib.suppress(OSError):
            for line in self.acl_file.read_text().splitlines():
                name = line.split(" ", 2)[1] if line.startswith("user ") else ""
                if name and name not in ("default", DAEMON_USER):
                    lines.append(line)
        write_private(self.acl_file, ("\n".join(lines) + "\n").encode(), self.run_as)

    async def on_start(self) -> None:
        binary = reachable_install(find_valkey_server(self.binary_override), self.run_as)
        ensure_reachable(binary, self.run_as)
        prepare_home(self.state_dir, self.run_as, self.log)
        ensure_reachable(self.root, self.run_as)
        adopt(self.root, self.run_as)
        make_private_dir(self.root, self.run_as)
        make_private_dir(self.socket_dir.parent, RunAs.current(), 0o755)
        # Agents connect as accounts of their own (never the daemon's: it can
        # read the secrets): the socket is open to every local account, which
        # must still log in; the default user is off.
        make_private_dir(self.socket_dir, self.run_as, 0o711)
        await self._stop_orphan()
        self._write_acl_file()
        argv = [
            str(binary),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "666",
            "--dir",
            str(self.root),
            "--pidfile",
            str(self.pid_file),
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--logfile",
            "",
            "--aclfile",
            str(self.acl_file),
            "--maxmemory",
            self.max_memory,
            "--maxmemory-policy",
            "noeviction",
            "--proto-max-bulk-len",
            self.max_value,
        ]
        await self.launch(argv, cwd=self.root, log_path=self.root / "valkey.log")
        await self._wait_ready()

    async def _stop_orphan(self) -> None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if not pid_alive(pid, "-server"):
            return
        self.log.warning("orphan_server_stopping", server="valkey", pid=pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while pid_alive(pid, "-server") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _wait_ready(self) -> None:
        # Loaded here: the command line's data commands load this module
        # (for the embedded PostgreSQL) and need no Redis client.
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.returncode is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"valkey exited during start (code {code}):\n{self.log_tail()}")
            client = aioredis.Redis(
                unix_socket_path=str(self.socket_path),
                username=DAEMON_USER,
                password=self.password,
                socket_timeout=2,
            )
            try:
                await client.ping()
                return
            except (OSError, RedisError) as exc:
                last = exc
                await asyncio.sleep(0.05)
            finally:
                await client.aclose()
        await self.terminate(10)
        raise RuntimeError(
            f"valkey not ready within {self.start_timeout:g}s: {last}\n{self.log_tail()}"
        )

    async def on_stop(self) -> None:
        await self.terminate(timeout=max(self.stop_hook_timeout - 3, 1))

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        data["pid"] = self.proc.pid if self.proc and self.proc.returncode is None else None
        data["socket"] = str(self.socket_path)
        return data
