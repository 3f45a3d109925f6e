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
  each record carries an HMAC-SHA256 over its ref, user, times and the user's
  credentials version, under a key kept in PostgreSQL (``key_source``, read
  for each use: lookups are rare behind the caller cache, and a rotated key
  ends every session at once). A record that does not verify (written or
  edited by anyone but the daemon, or signed under a rotated key) is a
  session that does not exist.
Times come from the Redis server's clock, so several daemons agree.

On a Redis Cluster the braced tag is the key's hash tag: a user's sessions
and index share one slot, so every script above stays atomic there too.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
from typing import Any, ClassVar, Literal

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AskError, MovedError

from actors.data.messages import SessionKey
from actors.kernel import Actor, handles
from actors.redis_link import (
    REDIS_FAILURES,
    RedisClientActor,
    RedisUnavailable,
    connect_redis,
    node_url,
)
from config import RedisSettings, SessionSettings

__all__ = [
    "Session",
    "SessionConflict",
    "SessionCreate",
    "SessionDelete",
    "SessionGet",
    "SessionList",
    "SessionNotFound",
    "SessionRevokeAll",
    "SessionRotate",
    "SessionUpdate",
    "Sessions",
    "SessionsUnavailable",
]

# The scripts whose writes a cluster replicates before the answer (_call_replicated).
_WRITES = frozenset({"create", "sign", "update", "rotate", "delete", "revoke_all"})

_ID_RE = re.compile(r"^[0-9a-f]{4}[A-Za-z0-9_-]{16,124}$")


class SessionNotFound(LookupError):
    """No such session (never existed, expired, deleted or revoked)."""


class SessionConflict(Exception):
    """The session changed since the version the caller read (HTTP 409)."""

    def __init__(self, current: int) -> None:
        super().__init__(f"session was modified (now at version {current})")
        self.current = current


class SessionsUnavailable(RedisUnavailable):
    """Redis cannot be reached (HTTP 503)."""


SessionKind = Literal["login", "app"]


class Session(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    ref: str  # sha256 of the id: safe to show and to log
    kind: SessionKind
    user_id: int
    data: Any
    version: int
    created_ms: int
    last_seen_ms: int
    expires_at_ms: int  # absolute deadline
    id: str | None = None  # only when the session is created or rotated
    # Login sessions: the user's credentials version when it was made (not listed).
    stamp: int | None = None


class SessionCreate(msgspec.Struct, frozen=True):
    user_id: int
    data: Any = None
    idle_ttl: int | None = None  # seconds; defaults from [sessions]
    absolute_ttl: int | None = None
    stamp: int = 0  # login sessions: the user's credentials version


class SessionGet(msgspec.Struct, frozen=True):
    id: str
    touch: bool = True


class SessionUpdate(msgspec.Struct, frozen=True):
    id: str
    data: Any
    version: int | None = None  # expected version; None = last write wins


class SessionDelete(msgspec.Struct, frozen=True):
    id: str


class SessionList(msgspec.Struct, frozen=True):
    user_id: int


class SessionRevokeAll(msgspec.Struct, frozen=True):
    user_id: int


class SessionRotate(msgspec.Struct, frozen=True):
    id: str


def _now_ms_lua() -> str:
    return "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"


# KEYS: session, index. ARGV: uid, data, idle_ms, absolute_ms, ref, max per user,
# session key prefix, stamp. Past the per-user bound, the other sessions nearest
# their deadline are removed (keys and index entries); never the one being created.
CREATE = (
    _now_ms_lua()
    + """
local deadline = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'uid', ARGV[1], 'data', ARGV[2], 'ver', 1, 'created', now,
           'seen', now, 'abs', deadline, 'idle', ARGV[3], 'stamp', ARGV[8])
redis.call('PEXPIRE', KEYS[1], math.min(tonumber(ARGV[3]), deadline - now))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], deadline, ARGV[5])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[6])
if over > 0 then
  for _, ref in ipairs(redis.call('ZRANGE', KEYS[2], 0, over)) do
    if over > 0 and ref ~= ARGV[5] then
      redis.call('UNLINK', ARGV[7] .. ref)
      redis.call('ZREM', KEYS[2], ref)
      over = over - 1
    end
  end
end
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], tonumber(last[2]))
return {now, deadline}
"""
)

# KEYS: session. MAC: ARGV[1] the MAC. Sets it on a session that exists.
SIGN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'mac', ARGV[1])
return 1
"""

# The fields GET and listings read, in this order.
FIELDS = ("uid", "data", "ver", "created", "seen", "abs", "idle", "stamp", "mac")

# KEYS: session. ARGV: touch (0/1). Returns nil or the FIELDS.
GET = (
    _now_ms_lua()
    + """
local f = redis.call('HMGET', KEYS[1], 'uid', 'data', 'ver', 'created', 'seen', 'abs', 'idle',
                     'stamp', 'mac')
if not f[1] then return nil end
local deadline = tonumber(f[6])
if now >= deadline then redis.call('UNLINK', KEYS[1]); return nil end
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'seen', now)
  redis.call('PEXPIRE', KEYS[1], math.min(tonumber(f[7]), deadline - now))
  f[5] = tostring(now)
end
return f
"""
)

# KEYS: session. ARGV: data, expected version ('' = any). {-1} missing, {-2, ver} conflict, {ver} ok.
UPDATE = (
    _now_ms_lua()
    + """
local f = redis.call('HMGET', KEYS[1], 'ver', 'abs', 'idle')
if not f[1] then return {-1} end
local deadline = tonumber(f[2])
if now >= deadline then redis.call('UNLINK', KEYS[1]); return {-1} end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= tonumber(f[1]) then return {-2, tonumber(f[1])} end
local ver = redis.call('HINCRBY', KEYS[1], 'ver', 1)
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'seen', now)
redis.call('PEXPIRE', KEYS[1], math.min(tonumber(f[3]), deadline - now))
return {ver}
"""
)

# KEYS: old session, new session, index. ARGV: old ref, new ref, the new MAC.
ROTATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('HINCRBY', KEYS[2], 'ver', 1)
redis.call('HSET', KEYS[2], 'mac', ARGV[3])
local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if score then redis.call('ZADD', KEYS[3], score, ARGV[2]) end
return 1
"""

# KEYS: index. ARGV: session key prefix. Removes every session of the user and the index.
REVOKE_ALL = """
local refs = redis.call('ZRANGE', KEYS[1], 0, -1)
local removed = 0
for _, ref in ipairs(refs) do removed = removed + redis.call('UNLINK', ARGV[1] .. ref) end
redis.call('UNLINK', KEYS[1])
return removed
"""


# KEYS: session. ARGV: index key prefix (the user id follows), ref. Removes the
# session and its index entry; replies 1 if it existed.
DELETE = """
local uid = redis.call('HGET', KEYS[1], 'uid')
if not uid then return 0 end
redis.call('UNLINK', KEYS[1])
redis.call('ZREM', ARGV[1] .. uid, ARGV[2])
return 1
"""


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
        key_source: Actor | None = None,
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
        self._nodes: dict[tuple[str, int], aioredis.Redis] = {}  # one client per cluster primary
        self.unreplicated = 0
        # Where the signing key comes from (the persistence actor); None: records are unsigned.
        self.key_source = key_source
        self._last_key: bytes | None = None
        self.forged = 0  # records that did not verify

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
            if script in _WRITES and self._wait_ms:
                return await self._call_replicated(script, keys, args)
            return await self._scripts[script](keys=keys, args=args)
        except REDIS_FAILURES as exc:
            raise self._down(exc) from exc

    async def _call_replicated(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """On a cluster: the script, then WAIT, in one pipeline on one
        connection to the primary of the keys' slot, so the answer comes once
        a replica has the write (or after ``redis.replica_wait``: such writes
        are counted). A MOVED or ASK answer is followed to the node it names;
        a node that cannot be reached makes the write fail (503), and the slot
        map is read again for the next one."""
        cluster = self._client()
        assert isinstance(cluster, RedisCluster)
        await cluster.initialize()  # (at once when it knows the slots already)
        node = cluster.get_node_from_key(keys[0])
        if node is None:
            raise self.unavailable("no primary serves the keys' slot now")
        where, asking = (node.host, int(node.port)), False
        source = self._scripts[script].script
        for _hop in range(3):
            pipe = self._node_client(*where).pipeline(transaction=False)
            if asking:
                pipe.execute_command("ASKING")
            pipe.execute_command("EVAL", source, len(keys), *keys, *args)
            pipe.execute_command("WAIT", 1, self._wait_ms)
            try:
                *_asked, result, acked = await pipe.execute(raise_on_error=False)
            except REDIS_FAILURES:
                with contextlib.suppress(*REDIS_FAILURES):
                    await cluster.nodes_manager.initialize()
                raise
            if isinstance(result, AskError):  # MovedError too: the slot is elsewhere
                where, asking = result.node_addr, not isinstance(result, MovedError)
                continue
            if isinstance(result, Exception):
                raise result
            if isinstance(acked, Exception) or int(acked) < 1:
                self.unreplicated += 1
            return result
        raise self.unavailable("the keys' slot kept moving; try again")

    def _node_client(self, host: str, port: int) -> aioredis.Redis:
        if (host, port) not in self._nodes:
            # A node URL without +cluster: a plain client, one connection a pipeline.
            made = connect_redis(
                node_url(self.url, host, port),
                name=f"{self.redis_client_name}-node",
                timeout=self.redis_settings.connect_timeout,
            )
            assert isinstance(made, aioredis.Redis)
            self._nodes[(host, port)] = made
        return self._nodes[(host, port)]

    async def on_stop(self) -> None:
        nodes, self._nodes = self._nodes, {}
        for client in nodes.values():
            with contextlib.suppress(*REDIS_FAILURES):
                await client.aclose()
        await super().on_stop()

    def snapshot(self) -> dict[str, Any]:
        data = super().snapshot()
        if self.cluster:
            data["replication"] = {"unreplicatedWrites": self.unreplicated}
        return data

    # -- signatures ---------------------------------------------------------------
    async def _signing_key(self) -> bytes | None:
        if self.key_source is None:
            return None
        try:
            key: bytes = await self.key_source.ask(SessionKey(), timeout=10)
        except Exception as exc:
            # PostgreSQL away: the key last read still proves what it signed
            # (a rotation, which needs the database, cannot have happened
            # unseen by it for long); none read yet: 503.
            if self._last_key is not None:
                return self._last_key
            raise self.unavailable(f"the login session key cannot be read: {exc}") from exc
        self._last_key = key
        return key

    def _mac(
        self, key: bytes, ref: str, uid: int, created: int, deadline: int, idle: int, stamp: int
    ) -> str:
        message = f"{self.space}|{ref}|{uid}|{created}|{deadline}|{idle}|{stamp}"
        return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()

    def _verified(self, key: bytes | None, ref: str, fields: list[Any]) -> bool:
        """Whether a record's fields (FIELDS) carry the daemon's signature
        (``key``: the signing key; None: this store is not signed)."""
        if key is None:
            return True
        try:
            uid, created, deadline, idle = (int(fields[i]) for i in (0, 3, 5, 6))
            stamp = int(fields[7])
            mac = fields[8].decode() if isinstance(fields[8], bytes) else str(fields[8])
        except (TypeError, ValueError, AttributeError):
            mac, uid, created, deadline, idle, stamp = "", 0, 0, 0, 0, 0
        expected = self._mac(key, ref, uid, created, deadline, idle, stamp)
        if hmac.compare_digest(expected, mac):
            return True
        self.forged += 1
        self.log.warning("session_record_refused", space=self.space, ref=ref[:12])
        return False

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
            stamp=None if stamp is None or self.key_source is None else int(stamp),
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
            mac = self._mac(key, ref, msg.user_id, int(now), int(deadline), idle * 1000, msg.stamp)
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
        if key is not None:
            mac = self._mac(
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
