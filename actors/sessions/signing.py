"""Proof that a login session record was written by the daemon.

Login sessions are credentials kept in a place agents can write (Redis):
each record carries an HMAC-SHA256 over its ref, user, times and the user's
credentials version, under a key kept in PostgreSQL (read for each use:
lookups are rare behind the caller cache, and a rotated key ends every
session at once). A record that does not verify (written or edited by anyone
but the daemon, or signed under a rotated key) is a session that does not
exist.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import structlog

from actors.persistence import PersistenceRef, SessionKey

__all__ = ["Signer"]

log = structlog.get_logger("jarvisd")


class Signer:
    def __init__(
        self, space: str, key_source: PersistenceRef, unavailable: type[Exception]
    ) -> None:
        self.space = space
        self.key_source = key_source
        self.unavailable = unavailable
        self._last_key: bytes | None = None
        self.forged = 0  # records that did not verify

    async def key(self) -> bytes:
        try:
            key = await self.key_source.ask(SessionKey(), timeout=10)
        except Exception as exc:
            # PostgreSQL away: the key last read still proves what it signed
            # (a rotation, which needs the database, cannot have happened
            # unseen by it for long); none read yet: 503.
            if self._last_key is not None:
                return self._last_key
            raise self.unavailable(f"the login session key cannot be read: {exc}") from exc
        self._last_key = key
        return key

    def mac(
        self, key: bytes, ref: str, uid: int, created: int, deadline: int, idle: int, stamp: int
    ) -> str:
        message = f"{self.space}|{ref}|{uid}|{created}|{deadline}|{idle}|{stamp}"
        return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()

    def verified(self, key: bytes, ref: str, fields: list[Any]) -> bool:
        """Whether a record's fields (scripts.FIELDS) carry the daemon's signature."""
        try:
            uid, created, deadline, idle = (int(fields[i]) for i in (0, 3, 5, 6))
            stamp = int(fields[7])
            mac = fields[8].decode() if isinstance(fields[8], bytes) else str(fields[8])
        except (TypeError, ValueError, AttributeError):
            mac, uid, created, deadline, idle, stamp = "", 0, 0, 0, 0, 0
        expected = self.mac(key, ref, uid, created, deadline, idle, stamp)
        if hmac.compare_digest(expected, mac):
            return True
        self.forged += 1
        log.warning("session_record_refused", space=self.space, ref=ref[:12])
        return False
