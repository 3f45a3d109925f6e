from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors.embedded import EMBEDDED_ACCOUNT
from actors.embedded.homes import SHARED_BIN_ROOT, SHARED_DATA_ROOT
from actors.redis_link import RedisClient, connect_redis
from config import LoadedConfig, Settings
from tests.cluster import LocalCluster
from tests.servers import (
    DatabaseFactory,
    Servers,
    check_external_postgres,
    delete_acl_users,
    make_state_dir,
    unlink_prefix,
)

# A run started in the background by a shell without job control (`make test &`,
# nohup) ignores SIGINT, and the commands the tests start would inherit that:
# the tests that stop `jarvisd subscribe` with Ctrl-C need it heard.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_ACCOUNT_BEFORE: list[bool] = []
# What embedded mode may keep outside a state directory (as root), before the suite.
_OUTSIDE_BEFORE: dict[Path, set[str] | None] = {}


def _listing(root: Path) -> set[str] | None:
    try:
        return {p.name for p in root.iterdir()}
    except FileNotFoundError:
        return None


def pytest_sessionstart(session: pytest.Session) -> None:
    """Whether the embedded servers' system account existed before the suite
    (as root, the suite makes it as the daemon would), and what was outside
    any state directory."""
    try:
        pwd.getpwnam(EMBEDDED_ACCOUNT)
        _ACCOUNT_BEFORE.append(True)
    except KeyError:
        _ACCOUNT_BEFORE.append(False)
    for root in (SHARED_DATA_ROOT, SHARED_BIN_ROOT):
        _OUTSIDE_BEFORE[root] = _listing(root)
    check_external_postgres()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The suite leaves nothing behind: no system account it made, nothing
    under embedded mode's folders outside the state directories (what is
    found there is removed, and fails the run)."""
    left: list[str] = []
    for root, before in _OUTSIDE_BEFORE.items():
        now = _listing(root)
        for name in sorted((now or set()) - (before or set())):
            left.append(str(root / name))
            shutil.rmtree(root / name, ignore_errors=True)
        if before is None and now is not None:
            with contextlib.suppress(OSError):
                root.rmdir()
    if left:
        print(f"\nthe suite left these behind (now removed): {left}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if os.geteuid() != 0 or not _ACCOUNT_BEFORE or _ACCOUNT_BEFORE[0]:
        return
    try:
        pwd.getpwnam(EMBEDDED_ACCOUNT)
    except KeyError:
        return
    subprocess.run(["userdel", EMBEDDED_ACCOUNT], check=False, capture_output=True)


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    srv = Servers.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def db_factory(servers: Servers) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(servers.postgres_dsn)
    yield factory
    factory.close()


@pytest.fixture
async def pg_dsn(db_factory: DatabaseFactory) -> AsyncIterator[str]:
    """A fresh, migrated database of its own for this test."""
    dsn = await db_factory.create()
    yield dsn
    await db_factory.drop(dsn)


@pytest.fixture
async def empty_pg_dsn(db_factory: DatabaseFactory) -> AsyncIterator[str]:
    """A fresh database with no migrations applied."""
    dsn = await db_factory.create(migrated=False)
    yield dsn
    await db_factory.drop(dsn)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[str]:
    """The URL of a Redis Cluster: ``JARVISD_TEST_REDIS_CLUSTER_URL``, else a
    local one of 3 primaries and 3 replicas, started once for the session."""
    external = os.environ.get("JARVISD_TEST_REDIS_CLUSTER_URL")
    if external:
        yield external
        return
    cluster = LocalCluster.start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def redis_url(servers: Servers) -> str:
    """The Redis the test's actors use; modules that run on a cluster as well
    override it with a parametrised one (``on_single_and_cluster``)."""
    return servers.redis_url


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; everything under it is removed afterwards."""
    prefix = f"jt:{uuid.uuid4().hex[:10]}:"
    yield prefix
    await unlink_prefix(redis_url, prefix)
    await delete_acl_users(redis_url, prefix)


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[RedisClient]:
    """A plain client on the test Redis (or cluster), to look behind the actors' backs."""
    client = connect_redis(redis_url, name="jarvisd-test")
    yield client
    await client.aclose()


@pytest.fixture
def state_dir() -> Iterator[Path]:
    import shutil

    path = make_state_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def make_config(
    redis_url: str, pg_dsn: str, redis_prefix: str, tmp_path: Path
) -> Callable[..., LoadedConfig]:
    """Settings for an in-process daemon on this test's database and prefix."""

    def build(**sections: dict[str, Any]) -> LoadedConfig:
        data: dict[str, dict[str, Any]] = {
            "daemon": {
                "state_dir": str(tmp_path / "state"),
                "health_interval": 0.2,
                "shutdown_timeout": 5,
                "log_level": "warning",
            },
            "supervisor": {"backoff_initial": 0.05, "backoff_max": 0.5},
            "http": {"port": 0, "unix_socket": str(tmp_path / "jarvisd.sock")},
            "postgres": {"dsn": pg_dsn, "pool_min": 1, "pool_max": 4},
            "redis": {"url": redis_url, "prefix": redis_prefix},
            # Tests choose scores themselves; the rules (delete*, transfer*, …) stay.
            "approvals": {"default_score": 0},
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return LoadedConfig(settings=msgspec.convert(data, Settings), path=None)

    return build


@pytest.fixture(autouse=True)
async def _fail_on_loop_errors() -> AsyncIterator[None]:
    """Like asyncpg's test base: an unhandled error in the loop fails the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield
    loop.set_exception_handler(previous)
    if errors:
        pytest.fail(f"unhandled errors in the event loop: {errors}")
