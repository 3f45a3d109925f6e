"""Where the embedded servers keep their data, sockets and binaries.

Normally all of it is in the state directory. Running as root from a folder
the servers' account cannot enter (a checkout under /root), the data goes to
a root-owned home under ``/var/lib/jarvisd-embedded`` and binaries out of
reach are copied under ``/var/cache/jarvisd``. Such a home is marked with the
instance it belongs to, and removed once that instance is gone: at the start
of any instance, and by ``jarvisd embedded forget`` (``make distclean``),
so that nothing stays behind outside the instance's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import msgspec

from actors.embedded.account import RunAs
from actors.embedded.child import pid_alive
from actors.kernel import FatalActorError

__all__ = [
    "SHARED_BIN_ROOT",
    "SHARED_DATA_ROOT",
    "blocking_dir",
    "embedded_home",
    "ensure_reachable",
    "forget",
    "forget_mirrors",
    "make_private_dir",
    "prepare_home",
    "reachable_install",
    "remove_empty_roots",
    "remove_gone_homes",
    "runtime_dir",
]

# sun_path is 108 bytes on Linux including the NUL; leave room for socket names.
_MAX_SOCKET_DIR = 80


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
    """Create the embedded home; when it is not the state directory, mark it
    as this instance's and leave a symlink ``embedded-data`` in the state
    directory that points to it."""
    home = embedded_home(state_dir, who)
    state_dir.mkdir(parents=True, exist_ok=True)
    if home == state_dir:
        return home
    me = RunAs.current()
    make_private_dir(SHARED_DATA_ROOT, me, 0o755)
    make_private_dir(home, me, 0o755)
    if _owner(home) is None:
        _mark(home, state_dir)
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


# -- whose a relocated home is, and removing it once its instance is gone -------------------
_MARK = ".instance"
# In the state directory: the instance's identity, which its relocated home
# records (a folder made again at the same path is another instance; its
# inode may well be the old one's).
_ID = "embedded-data.id"


class _Owner(msgspec.Struct, frozen=True, rename="camel"):
    state_dir: str
    id: str
    dev: int  # the state directory's file system


def _instance_id(state_dir: Path) -> str | None:
    try:
        return (state_dir / _ID).read_text().strip() or None
    except OSError:
        return None


def _mark(home: Path, state_dir: Path) -> None:
    ident = _instance_id(state_dir)
    if ident is None:
        ident = secrets.token_hex(16)
        (state_dir / _ID).write_text(ident + "\n")
    owner = _Owner(str(state_dir.resolve()), ident, state_dir.stat().st_dev)
    (home / _MARK).write_bytes(msgspec.json.encode(owner))


def _owner(home: Path) -> _Owner | None:
    try:
        return msgspec.json.decode((home / _MARK).read_bytes(), type=_Owner)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def _gone(owner: _Owner) -> bool:
    """Whether the instance that made a home is gone: its state directory is
    no more (the folder above it is there, on the same file system: not a
    file system that is only unmounted), or another instance has its path."""
    path = Path(owner.state_dir)
    if path.is_dir():
        return _instance_id(path) != owner.id
    try:
        return path.parent.stat().st_dev == owner.dev
    except OSError:
        return False


def _running(home: Path) -> bool:
    """Whether a server still runs on a home's data."""
    for pid_file, needle in (
        (home / "postgres" / "data" / "postmaster.pid", "postgres"),
        (home / "valkey" / "valkey.pid", "-server"),
    ):
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0].strip())
        except (OSError, ValueError):
            continue
        if pid_alive(pid, needle):
            return True
    return False


def _remove(home: Path, log: Any, why: str) -> None:
    shutil.rmtree(home, ignore_errors=True)
    log.warning("embedded_data_removed", data=str(home), reason=why)


def remove_gone_homes(who: RunAs, log: Any) -> None:
    """At an instance's start (its lock held, no server of it started yet):
    each relocated home whose instance is gone is removed — this one's, when
    its state directory was deleted and made again at the same path (its
    servers start afresh, as its new secrets require), and any other whose
    state directory is gone."""
    if who.is_self or not SHARED_DATA_ROOT.is_dir():
        return
    for home in sorted(SHARED_DATA_ROOT.iterdir()):
        owner = _owner(home)
        if owner is None or _running(home):
            continue  # an older version's (no mark), or in use: left as it is
        if _gone(owner):
            _remove(home, log, f"its instance ({owner.state_dir}) is gone")
    remove_empty_roots()


def forget(state_dir: Path) -> list[Path]:
    """What embedded mode keeps outside ``state_dir`` for it (a relocated
    home, a socket folder in /tmp, copies of this install's binaries),
    removed; the instance must be stopped. Returns what was removed."""
    removed: list[Path] = []
    home = SHARED_DATA_ROOT / _digest(state_dir)
    if home.is_dir() and not _running(home):
        shutil.rmtree(home, ignore_errors=True)
        removed.append(home)
    sockets = Path("/tmp") / f"jarvisd-{_digest(state_dir)}"  # noqa: S108 - removed, not used
    if sockets.is_dir() and sockets.lstat().st_uid == os.geteuid():
        shutil.rmtree(sockets, ignore_errors=True)
        removed.append(sockets)
    removed += forget_mirrors(Path(sys.prefix))
    remove_empty_roots()
    return removed


def forget_mirrors(install: Path) -> list[Path]:
    """Copies of binaries made for an install under ``install`` (a virtual
    environment about to be removed)."""
    removed: list[Path] = []
    if not SHARED_BIN_ROOT.is_dir():
        return removed
    for entry in SHARED_BIN_ROOT.iterdir():
        try:
            source = Path((entry / ".source").read_text())
        except OSError:
            continue
        if source.is_relative_to(install.resolve()):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def remove_empty_roots() -> None:
    """The shared roots go once nothing is left in them."""
    for root in (SHARED_DATA_ROOT, SHARED_BIN_ROOT):
        with contextlib.suppress(OSError):  # missing, or not empty
            root.rmdir()


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
