"""The credential a WebSocket follows: checked again when an invalidation
names its user or token (``followers``), and by time (a token's expiry, a
login session's deadline or idle timeout, and every ``auth.cache_ttl``
seconds, which also keeps a used session alive). A credential no longer
valid ends the socket (1008); a changed role takes away what it may no
longer see. The deadline is a timer and a check a task made when due: a
socket waiting for neither holds neither."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import structlog

from actors.data.model import Principal
from jarvisd.http.auth import Unauthorized, principal_of
from jarvisd.http.ws_wire import WS_POLICY
from jarvisd.runtime import Runtime

__all__ = ["CredentialWatch", "Watched"]

log = structlog.get_logger("jarvisd", actor="http")


class Watched(Protocol):
    """The socket whose credential is watched."""

    @property
    def who(self) -> Principal: ...

    @property
    def ending(self) -> bool: ...

    def spawn(self, coro: object, name: str) -> asyncio.Task[None] | None: ...

    def end(self, code: int, reason: str) -> None: ...

    async def new_role(self, who: Principal) -> None: ...


class CredentialWatch:
    __slots__ = ("_again", "_checking", "_running", "_timer", "rt", "socket", "token")

    def __init__(self, rt: Runtime, socket: Watched, token: str) -> None:
        self.rt = rt
        self.socket = socket
        self.token = token
        self._running = False  # between start() and stop()
        self._checking: asyncio.Task[None] | None = None  # a check under way
        self._again = False  # and to be made once more when that ends
        self._timer: asyncio.TimerHandle | None = None  # the next check by time

    def start(self, *, check_now: bool) -> None:
        self._running = True
        self._arm()
        if check_now or self._again:
            self.soon()

    def stop(self) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._checking is not None:
            self._checking.cancel()

    def soon(self) -> None:
        """Check the credential again now (once more after, if asked again
        meanwhile); before start(), once it starts."""
        if self.socket.ending:
            return
        if not self._running or (self._checking is not None and not self._checking.done()):
            self._again = True  # not started yet, or checking: once more after
            return
        self._checking = self.socket.spawn(self._check(), "ws.recheck")

    async def _check(self) -> None:
        while True:
            self._again = False
            try:
                who = await principal_of(self.rt, self.token)
            except Unauthorized as exc:
                self.socket.end(WS_POLICY, f"credentials no longer valid: {exc.detail}")
                return
            except Exception as exc:  # the database did not answer: try again shortly
                log.info("ws_recheck_failed", error=repr(exc))
                await asyncio.sleep(1)
                continue
            current = self.socket.who
            if who.user_id != current.user_id:
                self.socket.end(WS_POLICY, "credentials no longer valid")
                return
            if who.role != current.role:
                await self.socket.new_role(who)
            if not self._again:
                return

    def _arm(self) -> None:
        wait = self.rt.settings.auth.cache_ttl
        expires_at = self.socket.who.expires_at
        if expires_at is not None:
            wait = min(wait, max(expires_at - time.time(), 0.0) + 0.05)
        self._timer = asyncio.get_running_loop().call_later(wait, self._time_is_up)

    def _time_is_up(self) -> None:
        self._timer = None
        if self._running and not self.socket.ending:
            self.soon()
            self._arm()
