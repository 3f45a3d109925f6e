"""Faults under a running daemon: Redis gone for a while, a database that
refuses writes, a full disk. The daemon stays up, says what is wrong (ready 503,
problem documents with Retry-After, never a 500), loses nothing it
acknowledged, and recovers by itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from actors.redis_link import RedisClient, connect_redis
from config import LoadedConfig
from jarvisd.http.keys import HTTP_METRICS
from tests.servers import Servers
from tests.test_api import Api
from tests.test_bus import BUS, drained, eventually, requested
from tests.test_http import Running, start_daemon
from tests.test_pubsub import OwnValkey, own_valkey  # noqa: F401 - the fixture
from tests.test_ws import FAST_PUBSUB


async def end_connections(admin: asyncpg.Connection, database: str) -> None:
    """Cut every connection to ``database`` (but the admin's own)."""
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()",
        database,
    )


async def committed_once(
    raw: RedisClient, db: asyncpg.Connection, running: Running, n: int, timeout: float
) -> None:
    """Once the inbox group has nothing unread or pending: ``n`` commands,
    each once, and nothing dead-lettered."""
    await eventually(lambda: drained(raw, running), timeout=timeout)
    assert await db.fetchval("SELECT count(*) FROM commands") == n
    assert await db.fetchval("SELECT count(DISTINCT request_id) FROM commands") == n
    assert await raw.xlen(f"{running.daemon.settings.inbox}:dead") == 0


def server_errors(running: Running) -> int:
    """Requests answered 500; and, as a fault must cost no part of the daemon
    its life, every actor is asserted to have run without a crash or a restart."""
    app = running.daemon.http.app
    assert app is not None
    broken = {
        a.name: (a.stats.crashes, a.stats.restarts)
        for a in running.daemon.supervisor.actors
        if (a.stats.crashes or a.stats.restarts) and not a.name.startswith("embedded")
    }
    assert broken == {}, f"actors crashed or restarted: {broken}"
    return sum(n for (_m, _r, status), n in app[HTTP_METRICS].requests.items() if status == "500")


async def ingest(url: str, stream: str, db: asyncpg.Connection, ids: list[str]) -> None:
    """XADD the envelopes, then wait until each is a command."""
    raw = connect_redis(url, name="jarvisd-test")
    try:
        for rid in ids:
            await raw.xadd(stream, {"envelope": requested(rid)})
    finally:
        await raw.aclose()

    async def all_there() -> bool:
        n = await db.fetchval("SELECT count(*) FROM commands WHERE request_id = ANY($1)", ids)
        return bool(n == len(ids))

    await eventually(all_there, timeout=30)


async def test_redis_gone_for_a_while_gives_503s_and_misses_then_everything_recovers(
    make_config: Callable[..., LoadedConfig],
    own_valkey: OwnValkey,  # noqa: F811
    pg_dsn: str,
) -> None:
    loaded = make_config(redis={"url": own_valkey.url, "connect_timeout": 1}, pubsub=FAST_PUBSUB,
                         bus=BUS)  # fmt: skip
    db = await asyncpg.connect(pg_dsn)
    async for running in start_daemon(loaded):
        await running.wait_ready()
        assert loaded.settings.http.unix_socket is not None
        api = Api(running, loaded.settings.http.unix_socket)
        try:
            uid, agent = await api.user("fault-agent", "agent")
            stream = running.daemon.settings.inbox
            await ingest(own_valkey.url, stream, db, [f"before-{i}" for i in range(50)])
            status, _h, _b = await api.call(
                "POST", "/cache/set", token=agent, json={"key": "k", "value": 1}
            )
            assert status == 200

            await own_valkey.server.stop()
            async with asyncio.timeout(10):
                while (await running.get("/health/ready"))[0] != 503:
                    await asyncio.sleep(0.05)
            status, _h, _b = await api.call("GET", "/cache/get/k", token=agent)
            assert status == 404  # a read that cannot be served is a miss
            for method, path, body in (
                ("POST", "/cache/set", {"key": "k2", "value": 2}),
                ("POST", "/sessions", {"userId": uid, "data": {}}),
            ):
                status, headers, problem = await api.call(method, path, token=agent, json=body)
                assert status == 503, problem
                assert headers["Retry-After"] == "1"
                assert headers["Content-Type"].startswith("application/problem+json")
            status, _h, page = await api.call("GET", "/commands?limit=5", token=agent)
            assert status == 200  # what needs only PostgreSQL goes on
            assert len(page["items"]) == 5

            own_valkey.server = own_valkey._new()  # back, empty (no append-only file)
            await own_valkey.server.start()
            await running.wait_ready(30)
            await ingest(own_valkey.url, stream, db, [f"after-{i}" for i in range(50)])
            status, _h, _b = await api.call(
                "POST", "/cache/set", token=agent, json={"key": "k", "value": 3}
            )
            assert status == 200
            status, _h, session = await api.call(
                "POST", "/sessions", token=agent, json={"userId": uid, "data": {"ok": True}}
            )
            assert status == 201, session
            assert await db.fetchval("SELECT count(*) FROM commands") == 100
            assert server_errors(running) == 0
        finally:
            await api.unix.close()
    await db.close()


async def test_a_database_that_refuses_writes_gives_503_and_the_pool_recovers_after(
    make_config: Callable[..., LoadedConfig], pg_dsn: str
) -> None:
    loaded = make_config()
    name = pg_dsn.split("?")[0].rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg_dsn)
    async for running in start_daemon(loaded):
        await running.wait_ready()
        assert loaded.settings.http.unix_socket is not None
        api = Api(running, loaded.settings.http.unix_socket)
        try:
            await api.user("before-read-only")
            # As a failed-over or full server would: every new transaction read-only.
            await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            await end_connections(admin, name)
            refused = []
            for n in range(5):  # the first may meet a terminated connection: 503 too
                status, headers, problem = await api.call(
                    "POST", "/users", local=True, json={"username": f"ro-{n}"}
                )
                refused.append(status)
                assert headers["Content-Type"].startswith("application/problem+json")
                assert status == 503, json.dumps(problem)
            await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            await end_connections(admin, name)
            async with asyncio.timeout(20):
                while True:
                    status, _h, _b = await api.call(
                        "POST", "/users", local=True, json={"username": "after-read-only"}
                    )
                    if status == 201:
                        break
                    assert status == 503
                    await asyncio.sleep(0.1)
            assert server_errors(running) == 0
        finally:
            await api.unix.close()
    await admin.close()


async def test_the_daemons_wall_clock_jumping_a_day_changes_no_expiry(
    make_config: Callable[..., LoadedConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lifetimes are kept by the servers' clocks (Redis TIME for sessions,
    PostgreSQL now() for tokens and approvals) and timeouts by the monotonic
    clock: the daemon's own wall clock going wrong expires nothing early and
    keeps nothing late."""
    loaded = make_config()
    async for running in start_daemon(loaded):
        await running.wait_ready()
        assert loaded.settings.http.unix_socket is not None
        api = Api(running, loaded.settings.http.unix_socket)
        try:
            uid, agent = await api.user("clock-agent", "agent")
            _u, requester = await api.user("clock-user")
            status, _h, session = await api.call(
                "POST", "/sessions", token=agent, json={"userId": uid, "idleTtl": 60}
            )
            assert status == 201
            status, _h, approval = await api.call(
                "POST", "/approvals", token=requester, json={"action": "x", "riskScore": 75}
            )
            assert status == 201
            real = time.time
            for jump in (2 * 86400, -2 * 86400):
                monkeypatch.setattr(time, "time", lambda jump=jump, real=real: real() + jump)
                status, _h, doc = await api.call("GET", f"/sessions/{session['id']}", token=agent)
                assert status == 200, (jump, doc)
                status, _h, doc = await api.call(
                    "GET", f"/approvals/{approval['id']}", token=requester
                )
                assert (status, doc["status"]) == (200, "pending"), jump
                status, _h, _doc = await api.call("GET", "/commands?limit=1", token=agent)
                assert status == 200, jump
                monkeypatch.undo()
            assert server_errors(running) == 0
        finally:
            await api.unix.close()


@pytest.mark.slow
async def test_postgres_away_for_10_s_during_an_ingest_loses_and_doubles_nothing(
    make_config: Callable[..., LoadedConfig], redis_url: str, pg_dsn: str, servers: Servers
) -> None:
    """The daemon stays up, readiness says 503, the inbox waits with its
    batch in hand; once PostgreSQL is back every envelope is one command."""
    name = pg_dsn.split("?")[0].rsplit("/", 1)[1]
    loaded = make_config(bus=BUS, daemon={"health_interval": 0.2})
    admin = await asyncpg.connect(servers.postgres_dsn)
    db = await asyncpg.connect(pg_dsn)
    ids = [f"away-{i}" for i in range(6000)]
    async for running in start_daemon(loaded):
        await running.wait_ready()
        stream = running.daemon.settings.inbox
        raw = connect_redis(redis_url, name="jarvisd-test")
        try:
            async with raw.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.xadd(stream, {"envelope": requested(rid)})
                await pipe.execute()
            async with asyncio.timeout(30):
                while await db.fetchval("SELECT count(*) FROM commands") < 500:
                    await asyncio.sleep(0.01)
            await db.close()
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await end_connections(admin, name)
            away_until = time.monotonic() + 10
            saw_503 = False
            while time.monotonic() < away_until:
                saw_503 = saw_503 or (await running.get("/health/ready"))[0] == 503
                assert (await running.get("/health/live"))[0] == 200
                await asyncio.sleep(0.2)
            assert saw_503
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            db = await asyncpg.connect(pg_dsn)
            await committed_once(raw, db, running, len(ids), timeout=60)
            await running.wait_ready(10)
            assert server_errors(running) == 0
        finally:
            await raw.aclose()
    await db.close()
    await admin.close()


@contextlib.contextmanager
def small_filesystem(size: str, owner_of: Path) -> Iterator[Path]:
    """A tmpfs of ``size`` owned by the owner of ``owner_of``; the test is
    skipped where this process may not mount one (it needs root)."""
    owner = owner_of.stat()
    where = Path(tempfile.mkdtemp(prefix="jarvisd-full-"))
    where.chmod(0o755)
    options = f"size={size},uid={owner.st_uid},gid={owner.st_gid},mode=0700"
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "jarvisd-test", str(where)],
            capture_output=True,
            check=False,
        )
        refused = mounted.stderr.decode().strip() if mounted.returncode != 0 else ""
    except FileNotFoundError:
        refused = "no mount command"
    if refused:
        where.rmdir()
        pytest.skip(f"cannot mount a small filesystem: {refused}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)  # busy: detach it
        with contextlib.suppress(OSError):
            where.rmdir()


def grow(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


async def move_table(db: asyncpg.Connection, table: str, space: str) -> None:
    """The table and its indexes into tablespace ``space``."""
    await db.execute(f"ALTER TABLE {table} SET TABLESPACE {space}")
    for index in await db.fetch(
        "SELECT indexrelid::regclass::text AS name FROM pg_index WHERE indrelid = $1::regclass",
        table,
    ):
        await db.execute(f"ALTER INDEX {index['name']} SET TABLESPACE {space}")


async def fill(db: asyncpg.Connection) -> None:
    """Rows of 1 kB into ``filler`` until the disk has no room for another page."""
    for rows in (100, 1):
        with pytest.raises(asyncpg.exceptions.DiskFullError):  # noqa: PT012 - until it raises
            for _ in range(100_000):
                await db.execute(
                    "INSERT INTO filler SELECT repeat(md5(random()::text), 32) "
                    "FROM generate_series(1, $1)",
                    rows,
                )


async def test_a_full_disk_gives_503_and_loses_nothing_once_there_is_room(
    make_config: Callable[..., LoadedConfig], redis_url: str, pg_dsn: str, servers: Servers
) -> None:
    """The commands table on a filesystem that fills up (a real ENOSPC from
    PostgreSQL, SQLSTATE 53100): a command over HTTP is a 503 problem
    document, envelopes on the inbox wait (none dead-lettered); once the
    filesystem has room, every envelope is one command and HTTP writes work."""
    admin = await asyncpg.connect(servers.postgres_dsn)
    try:
        if not await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            pytest.skip("a tablespace needs a superuser")
        data_dir = Path(await admin.fetchval("SHOW data_directory"))
        if not os.access(data_dir, os.F_OK):
            pytest.skip("the server's data directory is not on this machine")
        space = f"jarvisd_full_{secrets.token_hex(4)}"
        with small_filesystem("1m", data_dir) as where:
            await admin.execute(f"CREATE TABLESPACE {space} LOCATION '{where}'")
            try:
                await _full_disk(make_config, redis_url, pg_dsn, space, where)
            finally:
                await _put_back(pg_dsn, admin, space)
    finally:
        await admin.close()


async def _put_back(pg_dsn: str, admin: asyncpg.Connection, space: str) -> None:
    """Everything out of the small filesystem (the daemon has stopped), then
    the tablespace gone: the filesystem can be unmounted."""
    db = await asyncpg.connect(pg_dsn)
    try:
        await db.execute("DROP TABLE IF EXISTS filler")
        await move_table(db, "commands", "pg_default")
    finally:
        await db.close()
        await admin.execute(f"DROP TABLESPACE {space}")


async def _full_disk(
    make_config: Callable[..., LoadedConfig], redis_url: str, pg_dsn: str, space: str, where: Path
) -> None:
    loaded = make_config(bus=BUS)
    db = await asyncpg.connect(pg_dsn)
    try:
        async with contextlib.aclosing(start_daemon(loaded)) as daemons:
            async for running in daemons:
                await _fill_then_grow(running, loaded, redis_url, db, space, where)
    finally:
        await db.close()


async def _fill_then_grow(
    running: Running,
    loaded: LoadedConfig,
    redis_url: str,
    db: asyncpg.Connection,
    space: str,
    where: Path,
) -> None:
    ids = [f"full-{i}" for i in range(300)]
    await running.wait_ready()
    assert loaded.settings.http.unix_socket is not None
    api = Api(running, loaded.settings.http.unix_socket)
    raw = connect_redis(redis_url, name="jarvisd-test")
    try:
        _uid, agent = await api.user("full-agent", "agent")
        await move_table(db, "commands", space)
        await db.execute(f"CREATE TABLE filler (b text) TABLESPACE {space}")
        await fill(db)

        for n in range(3):
            status, headers, problem = await api.call(
                "POST", "/commands", token=agent, json={"action": "x", "requestId": f"h{n}"}
            )
            assert status == 503, problem
            assert headers["Content-Type"].startswith("application/problem+json")
            assert headers["Retry-After"] == "1"
            assert "DiskFullError" in problem["detail"], problem
        stream = running.daemon.settings.inbox
        async with raw.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.xadd(stream, {"envelope": requested(rid)})
            await pipe.execute()

        async with asyncio.timeout(20):  # read by the bus, none committed
            while (await raw.xinfo_groups(stream))[0]["pending"] == 0:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1)  # a few more tries
        assert await db.fetchval("SELECT count(*) FROM commands") == 0
        assert (await running.get("/health/live"))[0] == 200

        grow(where, "64m")  # room again
        await committed_once(raw, db, running, len(ids), timeout=30)
        status, _h, created = await api.call(
            "POST", "/commands", token=agent, json={"action": "x", "requestId": "h0"}
        )
        assert status == 201, created
        assert server_errors(running) == 0
    finally:
        await raw.aclose()
        await api.unix.close()
