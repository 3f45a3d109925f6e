"""Real PostgreSQL and Redis/Valkey for the test suite.

``JARVISD_TEST_POSTGRES_DSN`` / ``JARVISD_TEST_REDIS_URL`` name external
servers; unset, the suite starts embedded ones with the daemon's own code
(actors.embedded), once per session, on an event loop in a background
thread: the servers outlive each test's loop, and if the test process dies
the servers get their parent-death signal with the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from redis.asyncio.cluster import RedisCluster

from actors import migrate as migrations
from actors.embedded import EMBEDDED_ACCOUNT, EmbeddedPostgres, EmbeddedValkey, RunAs
from actors.redis_link import RedisClient, connect_redis

T = TypeVar("T")

# Durability buys nothing in throw-away test clusters; this keeps the suite fast.
FAST_PG = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


# Parameters of a module's own ``redis_url`` fixture: its tests run on one
# server and again on a Redis Cluster (marked ``cluster``).
SINGLE_AND_CLUSTER = ("single", pytest.param("cluster", marks=pytest.mark.cluster))


def redis_url_for(request: pytest.FixtureRequest) -> str:
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster"))
    servers: Servers = request.getfixturevalue("servers")
    return servers.redis_url


class LoopThread:
    """An event loop running in a daemon thread, for session-long resources."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="test-servers", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def make_state_dir(prefix: str = "jarvisd-test-") -> Path:
    """A scratch directory the unprivileged server user can traverse (pytest's
    own tmp directories are 0700 root and would lock it out)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@dataclass
class Servers:
    postgres_dsn: str  # an admin DSN: may create and drop databases
    redis_url: str
    embedded: bool
    state_dir: Path | None = None
    loop: LoopThread | None = None
    _actors: list[Any] = field(default_factory=list)

    @classmethod
    def start(cls, *, postgres: bool = True, redis: bool = True) -> Servers:
        """External servers where named, embedded ones for the rest. A server
        not wanted (``postgres=False`` / ``redis=False``) is not started and
        its address stays empty."""
        pg_dsn = os.environ.get("JARVISD_TEST_POSTGRES_DSN", "")
        redis_url = os.environ.get("JARVISD_TEST_REDIS_URL", "")
        need_pg = postgres and not pg_dsn
        need_redis = redis and not redis_url
        if not need_pg and not need_redis:
            return cls(pg_dsn, redis_url, embedded=False)
        loop = LoopThread()
        state_dir = make_state_dir()
        servers = cls(pg_dsn, redis_url, embedded=True, state_dir=state_dir, loop=loop)
        run_as = RunAs.resolve(EMBEDDED_ACCOUNT)
        if need_pg:
            pg = EmbeddedPostgres(state_dir, run_as=run_as, server_options=FAST_PG)
            loop.run(pg.start())
            servers._actors.append(pg)
            servers.postgres_dsn = pg.dsn
        if need_redis:
            vk = EmbeddedValkey(state_dir, run_as=run_as, appendonly=False)
            loop.run(vk.start())
            servers._actors.append(vk)
            servers.redis_url = vk.url
        return servers

    def stop(self) -> None:
        if self.loop is None:
            return
        try:
            for actor in reversed(self._actors):
                self.loop.run(actor.stop())
        finally:
            self.loop.close()
            if self.state_dir is not None:
                shutil.rmtree(self.state_dir, ignore_errors=True)


def dsn_with_database(dsn: str, database: str) -> str:
    """Swap the database of a URL DSN, keeping host, socket and options."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def check_external_postgres() -> None:
    """A JARVISD_TEST_POSTGRES_DSN the suite cannot use is said at once, in
    words, rather than as a traceback in every test."""
    dsn = os.environ.get("JARVISD_TEST_POSTGRES_DSN")
    if not dsn:
        return

    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        await conn.close()

    try:
        asyncio.run(probe())
    except asyncpg.InvalidCatalogNameError as exc:
        raise pytest.UsageError(
            f"JARVISD_TEST_POSTGRES_DSN names a database that does not exist ({exc}): name "
            "one that does (the tests make databases of their own beside it), e.g. "
            "postgresql://USER@127.0.0.1:5432/postgres"
        ) from None
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise pytest.UsageError(
            f"JARVISD_TEST_POSTGRES_DSN: cannot connect ({type(exc).__name__}: {exc}); "
            "unset it to run on embedded servers"
        ) from None


class DatabaseFactory:
    """Fresh databases cloned from one migrated template. Cloning takes a
    few tenths of a second, most of it the server's, while a test mostly
    waits: so the next test's database is cloned on a thread of its own
    while this one runs, and a finished test's database is dropped there."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.template = f"jarvisd_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._template_ready = False
        self._worker: LoopThread | None = None
        self._spare: Future[str] | None = None
        self._drops: list[Future[None]] = []

    async def _admin(self, sql: str) -> None:
        """One statement (CREATE/DROP DATABASE) on a connection of its own."""
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if self._worker is None:
            self._worker = LoopThread()
        return asyncio.run_coroutine_threadsafe(coro, self._worker.loop)

    async def ensure_template(self) -> None:
        if self._template_ready:
            return
        await self._admin(f'CREATE DATABASE "{self.template}"')
        tpl = await asyncpg.connect(dsn_with_database(self.admin_dsn, self.template))
        try:
            await migrations.migrate(tpl)
        finally:
            await tpl.close()
        self._template_ready = True

    async def _clone(self) -> str:
        """On the factory's thread: a migrated database, by name."""
        await self.ensure_template()
        name = f"jarvisd_t_{uuid.uuid4().hex[:12]}"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name

    async def create(self, *, migrated: bool = True) -> str:
        if not migrated:
            name = f"jarvisd_t_{uuid.uuid4().hex[:12]}"
            await self._admin(f'CREATE DATABASE "{name}"')
            return dsn_with_database(self.admin_dsn, name)
        spare, self._spare = self._spare, None
        try:
            name = await asyncio.wrap_future(spare or self._submit(self._clone()))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            # Made while a test had the server away, say: made again now.
            name = await asyncio.wrap_future(self._submit(self._clone()))
        self._spare = self._submit(self._clone())  # the next test's, made meanwhile
        return dsn_with_database(self.admin_dsn, name)

    async def drop(self, dsn: str) -> None:
        """Dropped on the factory's thread (``close`` waits for it)."""
        name = dsn.split("?")[0].rsplit("/", 1)[1]
        self._drops = [f for f in self._drops if not f.done() or f.exception()]
        self._drops.append(self._submit(self._drop(name)))

    async def _drop(self, name: str) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        """The spare, every database given out and the template dropped,
        whatever one of them meets; then the first error met is raised."""
        if self._worker is None:
            return
        errors: list[BaseException] = []

        def wait(fut: Future[Any]) -> Any:
            try:
                return fut.result(60)
            except Exception as exc:
                errors.append(exc)
                return None

        try:
            if self._spare is not None:
                # One that failed to be made is nothing to drop (nobody had it).
                with contextlib.suppress(Exception):
                    self._drops.append(self._submit(self._drop(self._spare.result(60))))
            for fut in self._drops:
                wait(fut)
            if self._template_ready:
                wait(self._submit(self._drop(self.template)))
        finally:
            self._worker.close()
            self._worker = None
        if errors:
            raise errors[0]


async def listen(client: RedisClient, *channels: str) -> Any:
    """A pub/sub listener subscribed to ``channels`` (on a cluster: on one
    node, which hears what is published on any)."""
    if isinstance(client, RedisCluster):
        await client.initialize()  # its pub/sub needs the slot map first
    listener = client.pubsub()
    await listener.subscribe(*channels)
    return listener


async def subscribers(client: RedisClient, channel: str) -> int:
    """How many connections are subscribed to ``channel`` (every node of a cluster)."""
    if isinstance(client, RedisCluster):
        counts: Any = await client.pubsub_numsub(channel, target_nodes=RedisCluster.ALL_NODES)
    else:
        counts = await client.pubsub_numsub(channel)
    return sum(int(n) for _c, n in counts)


def _entry_id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = (value.decode() if isinstance(value, bytes) else value).partition("-")
    return int(ms), int(seq or 0)


async def stream_drained(client: RedisClient, stream: str) -> bool:
    """Whether the stream's (first) group has been given every entry added so
    far and has acknowledged them all. Read from the ids, not the group's
    ``lag``: the server reports that as nil once entries were trimmed or
    deleted, which would read as "nothing left" before anything was read."""
    info = await client.xinfo_stream(stream)
    groups = await client.xinfo_groups(stream)
    return (
        bool(groups)
        and groups[0]["pending"] == 0
        and _entry_id(groups[0]["last-delivered-id"]) >= _entry_id(info["last-generated-id"])
    )


async def until_gone(client: RedisClient, *keys: str, timeout: float = 10.0) -> None:
    """Return once every key has expired (Redis reports expired keys as absent)."""
    async with asyncio.timeout(timeout):
        while await client.exists(*keys):
            await asyncio.sleep(0.01)


async def unlink_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN + UNLINK, never KEYS; every
    primary of a cluster)."""
    client = connect_redis(url, name="jarvisd-test")
    removed = 0
    try:
        batch: list[Any] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
        for start in range(0, len(batch), 1000):
            # One key a command: a cluster's keys are in many slots.
            async with client.pipeline(transaction=False) as pipe:
                for key in batch[start : start + 1000]:
                    pipe.execute_command("UNLINK", key)
                removed += sum(await pipe.execute())
    finally:
        await client.aclose()
    return removed


async def delete_acl_users(url: str, prefix: str) -> int:
    """Delete the Redis ACL users named under ``prefix`` (the agents a test's
    daemon made), on every node of a cluster."""
    client = connect_redis(url, name="jarvisd-test")
    removed = 0
    try:
        if isinstance(client, RedisCluster):
            await client.initialize()
            nodes = client.get_nodes()
        else:
            nodes = [None]
        for node in nodes:
            kwargs: dict[str, Any] = {} if node is None else {"target_nodes": node}
            users: Any = await client.execute_command("ACL", "USERS", **kwargs)
            names = [u.decode() if isinstance(u, bytes) else str(u) for u in users]
            mine = [u for u in names if u.startswith(prefix)]
            if mine:
                removed += int(await client.execute_command("ACL", "DELUSER", *mine, **kwargs))
    finally:
        await client.aclose()
    return removed
