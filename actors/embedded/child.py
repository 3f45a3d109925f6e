"""A supervised child server process, the common part of the embedded servers.

The child runs in its own session (a Ctrl-C on the terminal reaches only the
daemon, which then stops the child in order), writes its output to a log file
in the state directory (no pipe to fill up), and gets a parent-death signal so
that even a ``kill -9`` of the daemon leaves no server behind. When the
daemon runs as root the child runs as a system account of its own (``account``).

Each server requires credentials (PostgreSQL scram, Valkey an ACL user):
the passwords live in ``state_dir/secrets/`` (0700, files 0600), readable
only by the daemon's own user.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import secrets
import signal
from pathlib import Path
from typing import Any, ClassVar

from actors.embedded.account import RunAs
from actors.kernel import Actor, FatalActorError, Health

__all__ = [
    "ChildExited",
    "ChildServer",
    "adopt",
    "pid_alive",
    "secret",
    "write_private",
]

_PR_SET_PDEATHSIG = 1
_libc: Any = None


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


class ChildExited(Exception):
    """The child server exited while it should have been running."""


def secret(state_dir: Path, name: str) -> str:
    """The secret ``name`` kept in ``state_dir/secrets`` (made on first use):
    only the daemon's own user may read it."""
    folder = state_dir / "secrets"
    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)
    path = folder / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (value + "\n").encode())
    finally:
        os.close(fd)
    return value


def write_private(path: Path, data: bytes, owner: RunAs) -> None:
    """Write ``path`` (0600, owned by ``owner``) in a folder ``owner`` may
    write to: whatever is there is unlinked first and the file made anew
    without following links, so the account cannot have root write (or
    chown) a file elsewhere through a planted symlink."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if not owner.is_self:
            os.fchown(fd, owner.uid, owner.gid)
        os.write(fd, data)
    finally:
        os.close(fd)


def adopt(path: Path, owner: RunAs) -> None:
    """Give ``path`` and everything under it to ``owner`` (data an older
    version kept under another account, such as ``nobody``)."""
    if os.geteuid() != 0 or not path.exists() or path.lstat().st_uid == owner.uid:
        return
    for dirpath, dirnames, filenames in os.walk(path):  # never follows links
        for entry in (dirpath, *(os.path.join(dirpath, n) for n in (*dirnames, *filenames))):
            os.lchown(entry, owner.uid, owner.gid)


def _pdeathsig(sig: int) -> Any:
    libc = _load_libc()

    def child_setup() -> None:  # runs in the forked child, before exec
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return child_setup


def pid_alive(pid: int, needle: str) -> bool:
    """True if ``pid`` runs and its command line contains ``needle``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return needle.encode() in cmdline


class ChildServer(Actor):
    """Base actor: spawn a server, watch it, stop it in order."""

    # Signal that asks the server for a clean, fast shutdown, also sent on parent death.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    server_name: ClassVar[str] = "server"
    independent: ClassVar[bool] = True  # the embedded servers start side by side

    def __init__(
        self, name: str, state_dir: Path, run_as: RunAs, *, start_timeout: float = 60.0
    ) -> None:
        super().__init__(name, mailbox_size=16)
        self.state_dir = state_dir
        self.run_as = run_as
        self.start_timeout = start_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path: Path | None = None
        self._stopping_child = False

    async def launch(
        self, argv: list[str], *, cwd: Path, log_path: Path
    ) -> asyncio.subprocess.Process:
        self.log_path = log_path
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
                preexec_fn=_pdeathsig(int(self.stop_signal)),
                **self.run_as.subprocess_kwargs(),
            )
        except PermissionError as exc:
            raise FatalActorError(
                f"cannot start {argv[0]} as user {self.run_as.name}: {exc}; every directory on the path "
                "to the binary and to the state directory must be searchable by that user"
            ) from exc
        finally:
            os.close(log_fd)
        self._stopping_child = False
        self.log.info(
            "child_started", server=self.server_name, pid=self.proc.pid, user=self.run_as.name
        )
        return self.proc

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def run(self) -> None:
        proc = self.proc
        if proc is None:
            return
        code = await proc.wait()
        if not self._stopping_child:
            raise ChildExited(f"{self.server_name} (pid {proc.pid}) exited with code {code}")

    async def check(self) -> Health | None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return Health(status="fail", detail=f"{self.server_name} is not running")
        return Health(status="pass", detail=f"{self.server_name} pid {proc.pid}")

    async def terminate(self, timeout: float) -> None:
        """Ask the child to stop with ``stop_signal``; escalate to SIGKILL after ``timeout``."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self._stopping_child = True
        try:
            proc.send_signal(self.stop_signal)
        except ProcessLookupError:
            return
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            self.log.warning("child_kill", server=self.server_name, pid=proc.pid, after=timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self.log.info("child_stopped", server=self.server_name, pid=proc.pid, code=proc.returncode)

    async def run_tool(self, argv: list[str], *, cwd: Path, timeout: float = 120.0) -> str:
        """Run a short-lived helper (initdb, pg_ctl) as the server user; return its output."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                **self.run_as.subprocess_kwargs(),
            )
        except PermissionError as exc:
            raise FatalActorError(
                f"cannot run {argv[0]} as user {self.run_as.name}: {exc}; every directory on the path "
                "to the binary and to the state directory must be searchable by that user"
            ) from exc
        try:
            async with asyncio.timeout(timeout):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"{Path(argv[0]).name} did not finish within {timeout:g}s") from None
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[0]).name} failed with code {proc.returncode}: {text.strip()[-2000:]}"
            )
        return text
