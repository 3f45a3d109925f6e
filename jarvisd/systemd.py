"""systemd integration with the standard library only (DESIGN §11).

- sd_notify: one AF_UNIX datagram per message to ``$NOTIFY_SOCKET`` (a path,
  or ``@name`` for the abstract namespace); a no-op without it.
- The watchdog pings at half of ``$WATCHDOG_USEC`` from a task on the event
  loop itself, only when ``$WATCHDOG_PID`` is unset or ours, and only while the
  supervisor has not given up: a wedged loop or a dying daemon misses pings
  and systemd restarts it.
- Socket activation: the sockets passed in ``LISTEN_FDS`` (from fd 3), when
  ``LISTEN_PID`` is ours, named by ``LISTEN_FDNAMES``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

__all__ = ["ActivatedSocket", "Notifier", "Watchdog", "listen_fds", "watchdog_interval"]

log = structlog.get_logger("jarvisd", actor="systemd")  # lazy: follows configure()
SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages; every method is a no-op without NOTIFY_SOCKET."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self._sock: socket.socket | None = None
        self.last_status = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one datagram; False if it could not be sent."""
        if self.address is None:
            return False
        payload = "\n".join(fields).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self.address)
        except OSError as exc:
            # systemd gone or the socket full: worth a log line, never a crash.
            log.warning(
                "sd_notify_failed", error=str(exc), fields=[f.split("=", 1)[0] for f in fields]
            )
            return False
        return True

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self.last_status:
            self.last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    def stopping(self, status: str = "draining") -> None:
        self.last_status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None when the watchdog
    is off or meant for another process."""
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec / 2_000_000


class Watchdog:
    """Pings from the event loop while ``healthy()`` holds; ``run()`` is a
    task of the daemon's, cancelled when the daemon has stopped."""

    def __init__(self, notifier: Notifier, interval: float, healthy: Callable[[], bool]) -> None:
        self.notifier = notifier
        self.interval = interval
        self.healthy = healthy
        self.pings = 0

    async def run(self) -> None:
        while True:
            if self.healthy():
                if self.notifier.watchdog():
                    self.pings += 1
            else:
                log.error("watchdog_withheld", reason="a part of the daemon failed for good")
            await asyncio.sleep(self.interval)


@dataclass(frozen=True, slots=True)
class ActivatedSocket:
    sock: socket.socket
    name: str

    @property
    def description(self) -> str:
        if self.sock.family == socket.AF_UNIX:
            return f"unix:{self.sock.getsockname()}"
        host, port = self.sock.getsockname()[:2]
        return f"tcp:{host}:{port}"


def listen_fds(env: dict[str, str] | None = None, *, unset: bool = True) -> list[ActivatedSocket]:
    """The listening sockets systemd passed us (sd_listen_fds_with_names).

    Only sockets meant for this pid are taken; each gets CLOEXEC so children
    (the embedded servers) never inherit them. With ``unset`` the variables
    are removed, as sd_listen_fds(1) does, so children do not see them."""
    environ = os.environ if env is None else env
    try:
        pid = int(environ.get("LISTEN_PID", "0"))
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    result: list[ActivatedSocket] = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise ValueError(f"socket activation: fd {fd} is not a stream socket")
        sock.setblocking(False)
        result.append(ActivatedSocket(sock, names[i] if i < len(names) else "unknown"))
    return result
