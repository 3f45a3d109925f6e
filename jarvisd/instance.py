"""The instance lock: one daemon per state directory (as PostgreSQL's
postmaster.pid is one postmaster per data directory).

``state_dir/jarvisd.pid`` is locked (flock) for as long as the daemon runs
and holds its pid, the time it started and, once it listens, its addresses.
It is taken before anything else — before any embedded server is looked at,
started or stopped — so that a second ``jarvisd run`` on the same state
directory changes nothing and says who holds it. The kernel releases the
lock when the process ends, however it ends (a ``kill -9`` included): a
file left behind by a dead daemon locks nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

__all__ = ["LOCK_FILE", "InstanceLock", "InstanceLocked"]

LOCK_FILE = "jarvisd.pid"


class InstanceLocked(Exception):
    """Another daemon runs on this state directory."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(
            f"another jarvisd runs on the state directory {path.parent} ({holder}); "
            f"stop it first, or give this one a state directory of its own (daemon.state_dir)"
        )
        self.path = path
        self.holder = holder


class InstanceLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def take(cls, state_dir: Path) -> InstanceLock:
        """Lock ``state_dir`` for this process, or raise InstanceLocked."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise InstanceLocked(path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        lock = cls(path, fd)
        lock.record([])
        return lock

    def record(self, addresses: list[str]) -> None:
        """Write this daemon's pid, start time and addresses into the file."""
        if self._fd is None:
            return
        text = f"{os.getpid()}\n{int(time.time())}\n{' '.join(addresses)}\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the flock


def _describe(content: str) -> str:
    lines = content.splitlines()
    pid = lines[0].strip() if lines else ""
    addresses = lines[2].strip() if len(lines) > 2 else ""
    if not pid:
        return "its pid is not known yet"
    where = f", listening on {addresses}" if addresses else ", not listening yet"
    return f"pid {pid}{where}"
