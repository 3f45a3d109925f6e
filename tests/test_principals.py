"""The principal cache: bounded, never ahead of a revocation, dropped at once
here and on every other daemon, and what it does while PostgreSQL is down."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from actors.data.model import Principal
from actors.pubsub import Delivery
from config import LoadedConfig
from jarvisd.principals import Invalidation, PrincipalCache
from tests.servers import Servers
from tests.test_api import Api
from tests.test_http import start_daemon


def principal(user_id: int, via: str = "token") -> Principal:
    return Principal(user_id=user_id, role="user", name=f"u{user_id}", via=via)  # type: ignore[arg-type]


# -- the cache alone --------------------------------------------------------------------------
def test_ten_thousand_distinct_tokens_never_grow_it_past_its_bound() -> None:
    cache = PrincipalCache(size=1000, ttl=60)
    cache.enable()
    for i in range(10_000):
        cache.put(f"key-{i}", principal(i), cache.generation, expires_at=None)
    assert len(cache) == 1000
    assert cache.get("key-9999") is not None  # the most recent stay
    assert cache.get("key-0") is None
    assert sum(len(keys) for keys in cache._by_user.values()) == 1000


def test_a_lookup_that_began_before_an_invalidation_is_not_stored() -> None:
    cache = PrincipalCache(size=10, ttl=60)
    cache.enable()
    generation = cache.generation  # a lookup starts ...
    cache.invalidate(Invalidation(kind="user", user_id=7))  # ... the user is disabled ...
    cache.put("k", principal(7), generation, expires_at=None)  # ... and its old answer arrives
    assert cache.get("k") is None


def test_entries_end_at_the_ttl_or_the_tokens_expiry_whichever_is_first() -> None:
    cache = PrincipalCache(size=10, ttl=60)
    cache.enable()
    cache.put("soon", principal(1), cache.generation, expires_at=time.time() - 1)
    assert cache.get("soon") is None
    cache.put("later", principal(2), cache.generation, expires_at=time.time() + 600)
    assert cache.get("later") is not None


def test_it_is_not_used_while_its_invalidations_cannot_arrive() -> None:
    cache = PrincipalCache(size=10, ttl=60)
    cache.put("k", principal(1), cache.generation, expires_at=None)
    assert cache.get("k") is None  # never enabled: never subscribed
    cache.enable()
    cache.put("k", principal(1), cache.generation, expires_at=None)
    cache.on_delivery(Delivery("down"))
    assert (cache.enabled, cache.get("k")) == (False, None)
    cache.on_delivery(Delivery("gap"))
    assert cache.enabled
    assert cache.get("k") is None  # what was missed meanwhile: everything is forgotten


# -- two daemons ----------------------------------------------------------------------------------
@pytest.fixture
async def pair(
    make_config: Callable[..., LoadedConfig], tmp_path: Path
) -> AsyncIterator[tuple[Api, Api]]:
    first = make_config()
    second = make_config(
        daemon={"state_dir": str(tmp_path / "second")},
        http={"unix_socket": str(tmp_path / "second.sock")},
    )
    async for a in start_daemon(first):
        async for b in start_daemon(second):
            await a.wait_ready()
            await b.wait_ready()
            api_a = Api(a, str(first.settings.http.unix_socket))
            api_b = Api(b, str(second.settings.http.unix_socket))
            await _cache_on(a.daemon.runtime.principals, b.daemon.runtime.principals)
            try:
                yield api_a, api_b
            finally:
                await api_a.unix.close()
                await api_b.unix.close()


async def _cache_on(*caches: PrincipalCache) -> None:
    async with asyncio.timeout(10):
        while not all(c.enabled for c in caches):
            await asyncio.sleep(0.02)


async def until(check: Callable[[], Any], limit: float) -> float:
    """Seconds until ``check()`` is true; fails past ``limit``."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < limit, "not within the limit"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def status_of(api: Api, token: str, path: str) -> int:
    return (await api.call("GET", path, token=token))[0]


async def test_a_revoked_token_is_refused_at_once_here_and_within_a_second_on_another_daemon(
    pair: tuple[Api, Api],
) -> None:
    a, b = pair
    uid, token = await a.user("to-revoke")
    _s, _h, tokens = await a.call("GET", f"/users/{uid}/tokens", local=True)
    for api in (a, b):  # both have it cached now
        assert await status_of(api, token, f"/users/{uid}") == 200
        assert await status_of(api, token, f"/users/{uid}") == 200
    assert b.r.daemon.runtime.principals.hits >= 1
    status, _h, _b = await a.call("DELETE", f"/users/{uid}/tokens/{tokens[0]['id']}", local=True)
    assert status == 200
    assert await status_of(a, token, f"/users/{uid}") == 401  # the answering daemon: at once
    took = await until(lambda: _refused(b, token, f"/users/{uid}"), 1.0)
    print(f"refused by the other daemon after {took * 1000:.1f} ms")


async def _refused(api: Api, token: str, path: str) -> bool:
    return await status_of(api, token, path) == 401


async def _allowed(api: Api, token: str, path: str) -> bool:
    return await status_of(api, token, path) == 200


async def test_a_disabled_users_session_is_refused_at_once_here_and_within_a_second_elsewhere(
    pair: tuple[Api, Api],
) -> None:
    a, b = pair
    uid, _t = await a.user("leaver", password="long password 1")
    _s, _h, login = await b.call(
        "POST", "/auth/login", json={"username": "leaver", "password": "long password 1"}
    )
    session = login["token"]
    for api in (a, b):
        assert await status_of(api, session, f"/users/{uid}") == 200
    await a.call("PUT", f"/users/{uid}", local=True, json={"disabled": True})
    assert await status_of(a, session, f"/users/{uid}") == 401
    await until(lambda: _refused(b, session, f"/users/{uid}"), 1.0)


async def test_a_role_change_takes_effect_at_once(pair: tuple[Api, Api]) -> None:
    a, b = pair
    uid, token = await a.user("promoted")
    for api in (a, b):
        assert await status_of(api, token, "/users") == 403
    await a.call("PUT", f"/users/{uid}", local=True, json={"role": "admin"})
    assert await status_of(a, token, "/users") == 200

    async def allowed() -> bool:
        return await status_of(b, token, "/users") == 200

    await until(allowed, 1.0)


# -- PostgreSQL down ----------------------------------------------------------------------------------
@pytest.fixture
def short_ttl() -> dict[str, Any]:
    return {"auth": {"cache_ttl": 2.0}}


async def test_while_postgres_is_down_cached_callers_pass_for_the_ttl_and_others_get_503(
    make_config: Callable[..., LoadedConfig],
    servers: Servers,
    pg_dsn: str,
    short_ttl: dict[str, Any],
) -> None:
    loaded = make_config(**short_ttl)
    async for running in start_daemon(loaded):
        await running.wait_ready()
        api = Api(running, str(loaded.settings.http.unix_socket))
        try:
            await _cache_on(running.daemon.runtime.principals)
            _a, known = await api.user("known-agent", "agent")
            _b, unknown = await api.user("unknown-agent", "agent")
            await api.call("POST", "/cache/set", token=known, json={"key": "k", "value": 1})
            assert await status_of(api, known, "/cache/get/k") == 200  # cached now
            name = pg_dsn.split("?")[0].rsplit("/", 1)[1]
            admin = await asyncpg.connect(servers.postgres_dsn)
            try:
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    name,
                )
                assert (
                    await status_of(api, known, "/cache/get/k") == 200
                )  # Redis only, cached caller
                status, headers, _problem = await api.call("GET", "/cache/get/k", token=unknown)
                assert status == 503
                assert headers["Content-Type"] == "application/problem+json"
                assert "Retry-After" in headers
                assert await status_of(api, known, "/commands") == 503  # needs PostgreSQL itself
                await asyncio.sleep(2.2)  # past the TTL: no longer trusted without PostgreSQL
                assert await status_of(api, known, "/cache/get/k") == 503
            finally:
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
                await admin.close()

            await until(functools.partial(_allowed, api, known, "/commands"), 15)
        finally:
            await api.unix.close()


async def test_the_cache_is_off_while_pubsub_is_down_and_requests_still_work(
    make_config: Callable[..., LoadedConfig],
) -> None:
    loaded = make_config()
    async for running in start_daemon(loaded):
        await running.wait_ready()
        api = Api(running, str(loaded.settings.http.unix_socket))
        try:
            cache = running.daemon.runtime.principals
            await _cache_on(cache)
            uid, token = await api.user("steady")
            await running.daemon.supervisor.get("pubsub").stop()
            assert not cache.enabled
            assert await status_of(api, token, f"/users/{uid}") == 200
            assert len(cache) == 0
        finally:
            await api.unix.close()


async def test_a_herd_of_requests_with_one_new_token_makes_one_database_lookup(
    pair: tuple[Api, Api],
) -> None:
    """When a busy caller's entry is new or has just expired, the requests
    arriving together share one lookup instead of filling the persistence
    mailbox (seen as a 756-deep mailbox under HTTP overload)."""
    api, _other = pair
    _uid, token = await api.user("herd", "agent")
    cache = api.r.daemon.runtime.principals
    misses, coalesced = cache.misses, cache.coalesced
    statuses = await asyncio.gather(
        *(status_of(api, token, "/commands?limit=1") for _ in range(200))
    )
    assert statuses == [200] * 200
    waited = cache.coalesced - coalesced
    assert waited >= 50  # those that came while it was being looked up (the rest: cache hits)
    assert cache.misses - misses - waited == 1  # one lookup in all
    bad = await asyncio.gather(*(status_of(api, "jv_" + "x" * 40, "/commands") for _ in range(50)))
    assert bad == [401] * 50  # a refusal is shared too, never turned into a pass
