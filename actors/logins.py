"""The logins actor: login sessions and the failed-login throttle (DESIGN §7, §8).

Login sessions are the ``Sessions`` store in the ``login`` key space: only
POST /auth/login makes them, after a password check, and only they
authenticate requests. Failed logins are counted per user name and per client
address in fixed windows (``[auth]``), shared by every daemon on the Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import msgspec

from actors.kernel import handles
from actors.sessions import Sessions
from config import AuthSettings, RedisSettings, SessionSettings

__all__ = ["LoginFailed", "LoginThrottle", "Logins"]


class LoginThrottle(msgspec.Struct, frozen=True):
    """Replies 0 when a login for ``username`` from ``address`` may be tried,
    else the seconds until it may (too many recent failures)."""

    username: str
    address: str


class LoginFailed(msgspec.Struct, frozen=True):
    """Count a failed login against the user name and the address."""

    username: str
    address: str


# One counter per script (the user's and the address's live in different
# cluster slots); both run at once.
# KEYS: counter. ARGV: limit. Replies the wait in ms (0: allowed).
THROTTLE = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then return math.max(redis.call('PTTL', KEYS[1]), 0) end
return 0
"""

# KEYS: counter. ARGV: window ms. A fixed window per key.
FAILED = """
if redis.call('INCR', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
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
        self._scripts["throttle"] = client.register_script(THROTTLE)
        self._scripts["failed"] = client.register_script(FAILED)

    def _counters(self, username: str, address: str) -> list[str]:
        # Hashed: bounded key length, and no user names in Redis key names.
        user = hashlib.sha256(username.casefold().encode()).hexdigest()[:32]
        addr = hashlib.sha256(address.encode()).hexdigest()[:32]
        base = f"{self.redis_settings.prefix}login-fail:"
        return [f"{base}u:{user}", f"{base}a:{addr}"]

    @handles(LoginThrottle)
    async def _throttle(self, msg: LoginThrottle) -> float:
        user, address = self._counters(msg.username, msg.address)
        waits = await asyncio.gather(
            self._call("throttle", [user], [self.auth.login_failures_per_user]),
            self._call("throttle", [address], [self.auth.login_failures_per_address]),
        )
        return max(max(int(w) for w in waits), 0) / 1000

    @handles(LoginFailed)
    async def _failed(self, msg: LoginFailed) -> None:
        window = [self.auth.login_window * 1000]
        user, address = self._counters(msg.username, msg.address)
        await asyncio.gather(
            self._call("failed", [user], window), self._call("failed", [address], window)
        )
