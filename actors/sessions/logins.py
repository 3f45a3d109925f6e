"""The logins actor: login sessions and the failed-login throttle (DESIGN §7, §8).

Login sessions are the ``Sessions`` store in the ``login`` key space: only
POST /auth/login makes them, after a password check, and only they
authenticate requests. Login attempts are counted per user name and per client
address in fixed windows (``[auth]``), shared by every daemon on the Redis,
before the password is checked; a right one is taken back, so the counters
hold the attempts that failed (or are still being checked).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, TypeVar

from actors.kernel import Message, Ref, handles
from actors.sessions.actor import Sessions
from actors.sessions.messages import SessionMessage
from config import AuthSettings, RedisSettings, SessionSettings

__all__ = ["LoginAttempt", "LoginMessage", "LoginSucceeded", "Logins", "LoginsRef"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)  # a message of a reply type is one of any wider type


class LoginMessage(Message[R_co], frozen=True):
    """A message only the logins actor answers, with ``R``."""


class LoginAttempt(LoginMessage[float], frozen=True):
    """Count a login attempt for ``username`` from ``address`` before its
    password is checked; replies 0 when it may be tried, else the seconds
    until one may (too many recent attempts that did not succeed)."""

    username: str
    address: str


class LoginSucceeded(LoginMessage[None], frozen=True):
    """The attempt was right: it no longer counts against the user or address."""

    username: str
    address: str


# One counter per script (the user's and the address's live in different
# cluster slots); both run at once. Counting comes before the password is
# checked, in one step with the comparison: of many attempts racing, only
# the first ``limit`` are verified, whatever their timing.
# KEYS: counter. ARGV: limit, window ms. Replies the wait in ms (0: go ahead).
ATTEMPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return math.max(redis.call('PTTL', KEYS[1]), 1)
end
return 0
"""

# KEYS: counter. Takes back one attempt that was right (or never verified).
SUCCEEDED = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 1
"""


class Logins(Sessions):
    """Login sessions (credentials) and the failed-login counters, in the
    ``login`` key spaces no API route can write."""

    def __init__(
        self,
        redis_settings: RedisSettings,
        settings: SessionSettings,
        auth: AuthSettings,
        url: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(redis_settings, settings, url, kind="login", **kwargs)
        self.auth = auth

    async def on_start(self) -> None:
        await super().on_start()
        client = self._client()
        self._scripts["attempt"] = client.register_script(ATTEMPT)
        self._scripts["succeeded"] = client.register_script(SUCCEEDED)

    def _counters(self, username: str, address: str) -> list[str]:
        # Hashed: bounded key length, and no user names in Redis key names.
        user = hashlib.sha256(username.casefold().encode()).hexdigest()[:32]
        addr = hashlib.sha256(address.encode()).hexdigest()[:32]
        base = f"{self.redis_settings.prefix}login-fail:"
        return [f"{base}u:{user}", f"{base}a:{addr}"]

    @handles(LoginAttempt)
    async def _attempt(self, msg: LoginAttempt) -> float:
        user, address = self._counters(msg.username, msg.address)
        window = self.auth.login_window * 1000
        waits = await asyncio.gather(
            self._call("attempt", [user], [self.auth.login_failures_per_user, window]),
            self._call("attempt", [address], [self.auth.login_failures_per_address, window]),
        )
        wait = max(int(w) for w in waits)
        if wait > 0:
            # Refused on one counter: the attempt is not made, so the other
            # counter takes it back.
            taken = [k for k, w in zip((user, address), waits, strict=True) if int(w) == 0]
            await asyncio.gather(*(self._call("succeeded", [k], []) for k in taken))
        return wait / 1000

    @handles(LoginSucceeded)
    async def _succeeded(self, msg: LoginSucceeded) -> None:
        user, address = self._counters(msg.username, msg.address)
        await asyncio.gather(
            self._call("succeeded", [user], []), self._call("succeeded", [address], [])
        )


class LoginsRef(Ref):
    """The logins actor: login sessions, and the failed-login throttle."""

    async def ask(
        self, msg: SessionMessage[R] | LoginMessage[R], timeout: float | None = None
    ) -> R:
        return await self._ask(msg, timeout)
