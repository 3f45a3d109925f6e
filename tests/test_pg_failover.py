"""PostgreSQL failover under a running daemon: a DSN naming a primary and
its standby (``target_session_attrs=read-write``); the primary killed, the
standby promoted; the daemon finds the new primary by itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from config import LoadedConfig
from tests.pg_pair import PgPair
from tests.test_api import Api
from tests.test_http import start_daemon

pytestmark = pytest.mark.slow


@pytest.fixture
def pg_pair() -> Iterator[PgPair]:
    pair = PgPair.start()
    try:
        yield pair
    finally:
        pair.stop()


async def postgres_check(api: Api) -> tuple[int, str]:
    status, doc = await api.r.json("/health/ready")
    return status, doc["checks"]["postgres"][0].get("output", "")


async def test_after_a_failover_the_daemon_reconnects_to_the_new_primary_by_itself(
    pg_pair: PgPair, make_config: Callable[..., LoadedConfig]
) -> None:
    loaded = make_config(
        postgres={"dsn": pg_pair.dsn, "connect_timeout": 2, "migrate_on_start": True}
    )
    async for running in start_daemon(loaded):
        await running.wait_ready()
        path = loaded.settings.http.unix_socket
        assert path is not None
        api = Api(running, path)
        try:
            status, detail = await postgres_check(api)
            assert (status, detail) == (200, f"ok: 127.0.0.1:{pg_pair.ports[0]}")
            before = [await api.user(f"before-{n}") for n in range(20)]  # acknowledged
            killed_at = time.monotonic()
            pg_pair.kill("primary")
            status, _h, problem = await api.call(
                "POST", "/users", local=True, json={"username": "x"}
            )
            assert status == 503, problem  # no primary: a clear 503, never a 500
            await pg_pair.promote()
            promoted = (200, f"ok: 127.0.0.1:{pg_pair.ports[1]}")  # readiness names the new host
            async with asyncio.timeout(30):
                while await postgres_check(api) != promoted:
                    await asyncio.sleep(0.05)
            recovered = time.monotonic() - killed_at
            await api.user("after")  # writes go to the new primary
            status, _h, users = await api.call("GET", "/users?limit=100", local=True)
            assert status == 200
            names = {u["username"] for u in users["items"]}
            assert {f"before-{n}" for n in range(20)} | {"after"} <= names
            assert len(before) == 20
            print(f"ready again {recovered:.2f} s after the primary was killed")
        finally:
            await api.unix.close()
