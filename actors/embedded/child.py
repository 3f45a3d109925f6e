"""A supervised child server process, the common part of the embedded servers.

The child runs in its own session (a Ctrl-C on the terminal reaches only the
daemon, which then stops the child in order), writes its output to a log file
in the state directory (no pipe to fill up), and gets a parent-death signal so
that even a ``kill -9`` of the daemon leaves no server behind. When the
daemon runs as root the child runs as a system account of its own
(``jarvisd-embedded``, created when missing), never a shared one such as
``nobody``, whose other processes would otherwise reach the servers.

Each server requires credentials (PostgreSQL scram, Valkey an ACL user):
the passwords live in ``state_dir/secrets/`` (0700, files 0600), readable
only by the daemon's own user.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from actors.kernel import Actor, FatalActorError, Health

__all__ = [
    "EMBEDDED_ACCOUNT",
    "ChildExited",
    "ChildServer",
    "RunAs",
    "ensure_account",
    "runtime_dir",
    "secret",
    "write_private",
]

# The system account the embedded servers run as when jarvisd runs as root.
EMBEDDED_ACCOUNT = "jarvisd-embedded"
# Accounts shared with other services: a server run as one of them would be
# reachable by every process of that account.
_SHARED_ACCOUNTS = frozenset({"nobody", "daemon", "bin", "sys", "www-data", "nogroup"})

# sun_path is 108 bytes on Linux including the NUL; leave room for socket names.
_MAX_SOCKET_DIR = 80
_PR_SET_PDEATHSIG = 1
_libc: Any = None


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


class ChildExited(Exception):
    """The child server exited while it should have been running."""


@dataclass(frozen=True, slots=True)
class RunAs:
    uid: int
    gid: int
    name: str

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    @classmethod
    def current(cls) -> RunAs:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:  # a DynamicUser may have no passwd entry visible
            name = str(uid)
        return cls(uid, os.getegid(), name)

    @classmethod
    def resolve(cls, unprivileged_user: str) -> RunAs:
        """Ourselves, or ``unprivileged_user`` when we are root (the default
        account is created when missing)."""
        if os.geteuid() != 0:
            return cls.current()
        if unprivileged_user in _SHARED_ACCOUNTS:
            raise FatalActorError(
                f"embedded.postgres_user {unprivileged_user!r} is shared with other services, "
                f"whose processes would reach the embedded servers; use an account of their own "
                f"(the default, {EMBEDDED_ACCOUNT!r}, is created when missing)"
            )
        if unprivileged_user == EMBEDDED_ACCOUNT:
            ensure_account(EMBEDDED_ACCOUNT)
        try:
            entry = pwd.getpwnam(unprivileged_user)
        except KeyError:
            raise FatalActorError(
                f"embedded.postgres_user {unprivileged_user!r} does not exist; running as root, "
                "the embedded servers need an unprivileged account of their own"
            ) from None
        if entry.pw_uid == 0:
            raise FatalActorError("embedded.postgres_user must not be root")
        return cls(entry.pw_uid, entry.pw_gid, entry.pw_name)

    def subprocess_kwargs(self) -> dict[str, Any]:
        if self.is_self:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def ensure_account(name: str) -> bool:
    """Create the system account ``name`` (no login, no home) if it does not
    exist; True when it was created."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    tool = shutil.which("useradd") or next(
        (p for p in ("/usr/sbin/useradd", "/sbin/useradd") if os.path.exists(p)), None
    )
    if tool is None:
        raise FatalActorError(
            f"the system account {name!r} for the embedded servers is missing and there is no "
            f"useradd to create it; create it (a system account without login) or set "
            f"embedded.postgres_user to one"
        )
    done = subprocess.run(
        [
            tool,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "jarvisd embedded PostgreSQL and Valkey",
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 and done.returncode != 9:  # 9: it exists (a race)
        raise FatalActorError(f"cannot create the system account {name!r}: {done.stderr.strip()}")
    return done.returncode == 0


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


# Root-owned, world-searchable homes used only when jarvisd runs as root from a
# folder the unprivileged server user cannot enter (a checkout under /root).
SHARED_DATA_ROOT = Path("/var/lib/jarvisd-embedded")
SHARED_BIN_ROOT = Path("/var/cache/jarvisd")


def _digest(path: Path) -> str:
    return hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:16]


def embedded_home(state_dir: Path, who: RunAs | None = None) -> Path:
    """Where the embedded servers keep data and sockets: the state directory,
    or, when the server user cannot reach it, a directory under
    SHARED_DATA_ROOT tied to that state directory (one per instance)."""
    if who is None or who.is_self or blocking_dir(state_dir, who) is None:
        return state_dir
    return SHARED_DATA_ROOT / _digest(state_dir)


def runtime_dir(state_dir: Path, who: RunAs | None = None) -> Path:
    """Directory for the servers' Unix sockets: under the embedded home when
    the path is short enough for sun_path, else a fixed short path in /tmp
    derived from the state directory (so other jarvisd commands find it too)."""
    preferred = embedded_home(state_dir, who) / "run"
    if len(os.fsencode(preferred)) <= _MAX_SOCKET_DIR:
        return preferred
    return Path("/tmp") / f"jarvisd-{_digest(state_dir)}"  # noqa: S108 - owner and mode are verified


def prepare_home(state_dir: Path, who: RunAs, log: Any) -> Path:
    """Create the embedded home; when it is not the state directory, leave a
    symlink ``embedded-data`` in the state directory that points to it."""
    home = embedded_home(state_dir, who)
    state_dir.mkdir(parents=True, exist_ok=True)
    if home == state_dir:
        return home
    me = RunAs.current()
    make_private_dir(SHARED_DATA_ROOT, me, 0o755)
    make_private_dir(home, me, 0o755)
    link = state_dir / "embedded-data"
    if not link.is_symlink():
        link.symlink_to(home)
    log.warning(
        "embedded_data_relocated",
        state_dir=str(state_dir),
        data=str(home),
        user=who.name,
        reason=f"{blocking_dir(state_dir, who)} is not searchable by {who.name}",
    )
    return home


def reachable_install(
    path: Path, who: RunAs, *, anchor: Path | None = None, parts: tuple[str, ...] = (".",)
) -> Path:
    """``path`` itself when ``who`` can reach it, else the same file inside a
    root-owned copy under SHARED_BIN_ROOT.

    ``parts`` (relative to ``anchor``, default: the file's folder) are copied
    keeping their layout, because the binaries find their libraries by
    relative paths (PostgreSQL's ../lib and ../share, a wheel's RPATH)."""
    if who.is_self or blocking_dir(path, who) is None:
        return path
    anchor = (anchor or path.parent).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{anchor}:{parts}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[
        :16
    ]
    me = RunAs.current()
    make_private_dir(SHARED_BIN_ROOT, me, 0o755)
    target = SHARED_BIN_ROOT / f"{path.name}-{key}"
    if not target.exists():
        scratch = SHARED_BIN_ROOT / f".{target.name}.{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o755)
        for part in parts:
            src = anchor / part
            if src.is_dir():
                shutil.copytree(
                    src,
                    scratch / part,
                    ignore=shutil.ignore_patterns("include"),
                    symlinks=True,
                    dirs_exist_ok=True,
                )
            elif src.exists():
                (scratch / part).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, scratch / part)
        (scratch / ".source").write_text(str(anchor))
        for dirpath, _dirs, _files in os.walk(scratch):
            os.chmod(dirpath, 0o755)  # noqa: S103 - read-only binaries the server user must reach
        try:
            scratch.rename(target)
        except OSError:  # another process made it first
            shutil.rmtree(scratch, ignore_errors=True)
        _prune_mirrors(keep=target)
    return target / path.resolve().relative_to(anchor)


def _prune_mirrors(keep: Path) -> None:
    """Drop copies whose source install is gone (an old checkout's venv)."""
    for entry in SHARED_BIN_ROOT.iterdir():
        source = entry / ".source"
        if entry == keep or not source.is_file():
            continue
        try:
            if not Path(source.read_text()).exists():
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def make_private_dir(path: Path, owner: RunAs, mode: int = 0o700) -> None:
    """Create ``path`` (or accept it) owned by ``owner`` with ``mode``; refuse
    anything else (a symlink or a directory someone else planted in /tmp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise FatalActorError(f"{path} exists and is not a directory")
    if st.st_uid != owner.uid:
        if os.geteuid() == 0 and st.st_uid in (0, owner.uid):
            os.chown(path, owner.uid, owner.gid)
        else:
            raise FatalActorError(f"{path} is owned by uid {st.st_uid}, expected {owner.name}")
    os.chmod(path, mode)


def blocking_dir(path: Path, who: RunAs) -> Path | None:
    """The first directory on the way to ``path`` that ``who`` cannot search."""
    if who.is_self:
        return None
    groups = (
        {who.gid, *os.getgrouplist(who.name, who.gid)} if who.name.isidentifier() else {who.gid}
    )
    current = Path("/")
    for part in path.resolve().parts[1:]:
        current = current / part
        try:
            st = current.stat()
        except FileNotFoundError:
            return None  # we create the rest ourselves, with the right owner
        if not stat.S_ISDIR(st.st_mode):
            return None
        if st.st_uid == who.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return current
    return None


def ensure_reachable(path: Path, who: RunAs) -> None:
    """Fail clearly if ``who`` cannot search every directory down to ``path``
    (rather than an obscure "Permission denied" from initdb)."""
    current = blocking_dir(path, who)
    if current is not None:
        mode = stat.S_IMODE(current.stat().st_mode)
        raise FatalActorError(
            f"user {who.name} cannot reach {path}: {current} is not searchable by it "
            f"(mode {mode:o}); choose another state directory, make that directory "
            "searchable (chmod o+x), or set embedded.postgres_user"
        )


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
