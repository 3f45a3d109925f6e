"""The sessions actors: user sessions in Redis (DESIGN §7).

Two instances of one class, each owning a key space of its own:

- ``logins`` (space ``login``): login sessions, made only by POST /auth/login
  after a password check. Their ids are credentials.
- ``sessions`` (space ``session``): application sessions, the session store
  services keep for their users (POST /sessions). They carry data, never
  authority: authentication never reads them.

In each:

- The id is the user's slot tag (4 hex digits, the same for all of a user's
  sessions) and ``secrets.token_urlsafe(32)``; it is a bearer secret: Redis
  only ever sees its SHA-256 (``{prefix}{space}:{tag}{sha256}``, the tag in
  braces), and listings show that hash ("ref"), never the id.
- TTL = min(idle, absolute - age), slid on every touch; the absolute deadline
  is also checked on read, so a session never outlives it.
- Each user has an index (``{prefix}{space}-user:{tag}{uid}``, a sorted set
  scored by deadline) to list and revoke all of their sessions; past
  ``sessions.max_per_user`` the sessions closest to their deadline go first.
- Lifetimes a client asks for are capped at ``sessions.max_ttl``.
- Updates carry a version and run in Lua: an update racing a delete finds no
  key and fails, it never recreates ("resurrects") the session.
- Rotation (at login) moves the session to a new id with RENAME, keeping its
  TTL and data, and the old id stops working at once.
- Login sessions are credentials kept in a place agents can write (Redis):
  each record is signed by the daemon (``signing``), and one that does not
  verify is a session that does not exist.
Times come from the Redis server's clock, so several daemons agree.

On a Redis Cluster the braced tag is the key's hash tag: a user's sessions
and index share one slot, so every script above stays atomic there too.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any, ClassVar

import msgspec

from actors.kernel import handles
from actors.persistence import PersistenceRef
from actors.redis_link import (
    REDIS_FAILURES,
    RedisClientActor,
    RedisUnavailable,
)
from actors.sessions.messages import (
    Session,
    SessionConflict,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionKind,
    SessionList,
    SessionNotFound,
    SessionRevokeAll,
    SessionRotate,
    SessionsUnavailable,
    SessionUpdate,
)
from actors.sessions.replicated import ReplicatedWrites
from actors.sessions.scripts import (
    CREATE,
    DELETE,
    FIELDS,
    GET,
    REVOKE_ALL,
    ROTATE,
    SIGN,
    UPDATE,
    WRITES,
)
from actors.sessions.signing import Signer
from config import RedisSettings, SessionSettings

__all__ = ["Sessions", "ref_of", "user_tag"]

_ID_RE = re.compile(r"^[0-9a-f]{4}[A-Za-z0-9_-]{16,124}$")


def ref_of(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def user_tag(user_id: int) -> str:
    """The hash tag every key of one user's sessions carries (4 hex digits)."""
    return hashlib.sha256(str(user_id).encode()).hexdigest()[:4]


class Sessions(RedisClientActor):
    unavailable: ClassVar[type[RedisUnavailable]] = SessionsUnavailable

    def __init__(
        self,
        redis_settings: RedisSettings,
        settings: SessionSettings,
        url: str,
        *,
        kind: SessionKind = "app",
        name: str | None = None,
        concurrency: int = 8,
        health_interval: float = 2.0,
        key_source: PersistenceRef | None = None,
    ) -> None:
        super().__init__(
            name or ("logins" if kind == "login" else "sessions"),
            redis_settings,
            url,
            client_name="jarvisd-logins" if kind == "login" else "jarvisd-sessions",
            mailbox_size=10_000,
            concurrency=concurrency,
            health_interval=health_interval,
        )
        self.kind: SessionKind = kind
        self.space = "login" if kind == "login" else "session"
        self.settings = settings
        self._scripts: dict[str, Any] = {}
        self.replicated = ReplicatedWrites(
            url,
            redis_settings,
            client=self._client,
            name=f"{self.redis_client_name}-node",
            wait_ms=lambda: self._wait_ms,
            unavailable=self.unavailable,
        )
        # Login records are signed under a key the persistence actor keeps;
        # None: this store's records are not signed (application sessions).
        self.signer = (
            None if key_source is None else Signer(self.space, key_source, self.unavailable)
        )

    @property
    def _wait_ms(self) -> int:
        return int(self.redis_settings.replica_wait * 1000) if self.cluster else 0

    def key_prefix(self, tag: str) -> str:
        return f"{self.redis_settings.prefix}{self.space}:{{{tag}}}"

    def key(self, tag: str, ref: str) -> str:
        return self.key_prefix(tag) + ref

    def key_for(self, user_id: int, ref: str) -> str:
        """The key of the session ``ref`` of ``user_id``."""
        return self.key(user_tag(user_id), ref)

    def index(self, user_id: int) -> str:
        return f"{self.redis_settings.prefix}{self.space}-user:{{{user_tag(user_id)}}}{user_id}"

    async def on_start(self) -> None:
        await super().on_start()
        client = self._client()
        for name, source in (
            ("create", CREATE),
            ("sign", SIGN),
            ("get", GET),
            ("update", UPDATE),
            ("rotate", ROTATE),
            ("revoke_all", REVOKE_ALL),
            ("delete", DELETE),
        ):
            self._scripts[name] = client.register_script(source)

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            if script in WRITES and self._wait_ms:
                return await self.replicated.call(self._scripts[script].script, keys, args)
            return await self._scripts[script](keys=keys, args=args)
        except REDIS_FAILURES as exc:
            raise self._down(exc) from exc

    async def on_stop(self) -> None:
        await self.replicated.close()
        await super().on_stop()

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        if self.signer is not None:
            data["forged"] = self.signer.forged
        if self.cluster:
            data["replication"] = {"unreplicatedWrites": self.replicated.unreplicated}
        return data

    @property
    def forged(self) -> int:
        """Records refused because they did not carry the daemon's signature."""
        return 0 if self.signer is None else self.signer.forged

    # -- signatures ---------------------------------------------------------------
    async def _signing_key(self) -> bytes | None:
        return None if self.signer is None else await self.signer.key()

    def _verified(self, key: bytes | None, ref: str, fields: list[Any]) -> bool:
        return key is None or self.signer is None or self.signer.verified(key, ref, fields)

    def _session(self, ref: str, fields: list[Any], session_id: str | None = None) -> Session:
        uid, data, ver, created, seen, deadline, _idle, stamp, _mac = fields
        return Session(
            ref=ref,
            kind=self.kind,
            user_id=int(uid),
            data=msgspec.json.decode(data),
            version=int(ver),
            created_ms=int(created),
            last_seen_ms=int(seen),
            expires_at_ms=int(deadline),
            id=session_id,
            stamp=None if stamp is None or self.signer is None else int(stamp),
        )

    @staticmethod
    def _ref(session_id: str) -> tuple[str, str]:
        """(tag, ref) of an id."""
        if not _ID_RE.match(session_id):
            raise SessionNotFound("no such session")  # same answer as a wrong id: nothing to probe
        return session_id[:4], ref_of(session_id)

    # -- handlers -----------------------------------------------------------------
    @handles(SessionCreate)
    async def _create(self, msg: SessionCreate) -> Session:
        s = self.settings
        idle = msg.idle_ttl or s.idle_ttl
        absolute = msg.absolute_ttl or s.absolute_ttl
        if idle <= 0 or absolute <= 0:
            raise ValueError("session TTLs must be positive")
        absolute = min(absolute, s.max_ttl)
        idle = min(idle, absolute)
        tag = user_tag(msg.user_id)
        session_id = tag + secrets.token_urlsafe(32)
        ref = ref_of(session_id)
        data = msgspec.json.encode(msg.data)
        key = await self._signing_key()
        now, deadline = await self._call(
            "create",
            [self.key(tag, ref), self.index(msg.user_id)],
            [
                msg.user_id,
                data,
                idle * 1000,
                absolute * 1000,
                ref,
                s.max_per_user,
                self.key_prefix(tag),
                msg.stamp,
            ],
        )
        if key is not None:
            # Usable from here on: until signed, the record is no session at all.
            assert self.signer is not None
            mac = self.signer.mac(
                key, ref, msg.user_id, int(now), int(deadline), idle * 1000, msg.stamp
            )
            if not await self._call("sign", [self.key(tag, ref)], [mac]):
                raise SessionNotFound("the session ended while it was made")
        return Session(
            ref=ref,
            kind=self.kind,
            user_id=msg.user_id,
            data=msg.data,
            version=1,
            created_ms=int(now),
            last_seen_ms=int(now),
            expires_at_ms=int(deadline),
            id=session_id,
            stamp=msg.stamp if key is not None else None,
        )

    async def _fields(self, tag: str, ref: str, touch: bool) -> list[Any]:
        fields = await self._call("get", [self.key(tag, ref)], ["1" if touch else "0"])
        if fields is None or not self._verified(await self._signing_key(), ref, fields):
            raise SessionNotFound("no such session")
        return list(fields)

    @handles(SessionGet)
    async def _get(self, msg: SessionGet) -> Session:
        tag, ref = self._ref(msg.id)
        return self._session(ref, await self._fields(tag, ref, msg.touch))

    @handles(SessionUpdate)
    async def _update(self, msg: SessionUpdate) -> int:
        tag, ref = self._ref(msg.id)
        expected = "" if msg.version is None else str(msg.version)
        reply = await self._call(
            "update", [self.key(tag, ref)], [msgspec.json.encode(msg.data), expected]
        )
        if int(reply[0]) == -1:
            raise SessionNotFound("no such session")
        if int(reply[0]) == -2:
            raise SessionConflict(int(reply[1]))
        return int(reply[0])

    @handles(SessionDelete)
    async def _delete(self, msg: SessionDelete) -> bool:
        tag, ref = self._ref(msg.id)
        index_prefix = f"{self.redis_settings.prefix}{self.space}-user:{{{tag}}}"
        removed = await self._call("delete", [self.key(tag, ref)], [index_prefix, ref])
        return bool(removed)

    @handles(SessionRotate)
    async def _rotate(self, msg: SessionRotate) -> Session:
        tag, old_ref = self._ref(msg.id)
        old = self._session(old_ref, fields := await self._fields(tag, old_ref, touch=False))
        new_id = tag + secrets.token_urlsafe(32)
        new_ref = ref_of(new_id)
        key = await self._signing_key()
        mac = ""
        if key is not None and self.signer is not None:
            mac = self.signer.mac(
                key,
                new_ref,
                old.user_id,
                old.created_ms,
                old.expires_at_ms,
                int(fields[6]),
                old.stamp or 0,
            )
        moved = await self._call(
            "rotate",
            [self.key(tag, old_ref), self.key(tag, new_ref), self.index(old.user_id)],
            [old_ref, new_ref, mac],
        )
        if not moved:
            raise SessionNotFound("no such session")
        session = await self._get(SessionGet(new_id, touch=True))
        return msgspec.structs.replace(session, id=new_id)

    @handles(SessionList)
    async def _list(self, msg: SessionList) -> list[Session]:
        client = self._client()
        index = self.index(msg.user_id)
        try:
            now_s, now_us = await client.time()
            now = now_s * 1000 + now_us // 1000
            await client.zremrangebyscore(index, "-inf", now)
            members: list[Any] = list(await client.zrange(index, 0, -1))
            refs = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
            async with client.pipeline(transaction=False) as pipe:
                for ref in refs:
                    pipe.hmget(self.key_for(msg.user_id, ref), *FIELDS)
                rows = await pipe.execute()
            out: list[Session] = []
            gone: list[str] = []
            key = await self._signing_key()
            for ref, row in zip(refs, rows, strict=True):
                if row[0] is None:
                    gone.append(ref)
                    continue
                if int(row[0]) != msg.user_id or not self._verified(key, ref, row):
                    continue  # not this user's, or not the daemon's: no session
                out.append(msgspec.structs.replace(self._session(ref, row), stamp=None))
            if gone:  # expired by idle TTL: tidy the index
                await client.zrem(index, *gone)
        except REDIS_FAILURES as exc:
            raise self._down(exc) from exc
        return out

    @handles(SessionRevokeAll)
    async def _revoke_all(self, msg: SessionRevokeAll) -> int:
        removed = await self._call(
            "revoke_all", [self.index(msg.user_id)], [self.key_prefix(user_tag(msg.user_id))]
        )
        return int(removed)
