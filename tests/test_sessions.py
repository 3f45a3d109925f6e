"""The sessions actor against a real Redis/Valkey (DESIGN §7)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from actors.sessions import (
    SessionConflict,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionList,
    SessionNotFound,
    SessionRevokeAll,
    SessionRotate,
    Sessions,
    SessionUpdate,
)
from config import RedisSettings, SessionSettings
from tests.servers import SINGLE_AND_CLUSTER, redis_url_for, until_gone


@pytest.fixture(params=SINGLE_AND_CLUSTER)
def redis_url(request: pytest.FixtureRequest) -> str:
    """Every test here runs on one server and again on a Redis Cluster."""
    return redis_url_for(request)


@pytest.fixture
async def sessions(redis_url: str, redis_prefix: str) -> AsyncIterator[Sessions]:
    actor = Sessions(
        RedisSettings(prefix=redis_prefix),
        SessionSettings(idle_ttl=600, absolute_ttl=3600),
        redis_url,
    )
    await actor.start()
    yield actor
    await actor.stop()


async def ask(actor: Sessions, msg: Any) -> Any:
    return await actor.ask(msg, timeout=10)


async def test_a_session_is_stored_under_the_hash_of_its_id(
    sessions: Sessions, raw: aioredis.Redis, redis_prefix: str
) -> None:
    s = await ask(sessions, SessionCreate(7, {"theme": "dark"}))
    assert s.id is not None
    assert len(s.id) >= 43
    assert s.ref == hashlib.sha256(s.id.encode()).hexdigest()
    keys = [k.decode() async for k in raw.scan_iter(match=f"{redis_prefix}*")]
    assert all(s.id not in k for k in keys)  # the bearer secret never reaches Redis
    assert sessions.key_for(s.user_id, s.ref) in keys
    got = await ask(sessions, SessionGet(s.id))
    assert (got.user_id, got.data, got.version, got.id) == (7, {"theme": "dark"}, 1, None)


async def test_a_users_sessions_and_their_index_share_one_cluster_slot(
    sessions: Sessions,
) -> None:
    """So that every session script (create with eviction, rotate, revoke
    all) stays in one slot of a Redis Cluster."""
    made = [await ask(sessions, SessionCreate(5, {})) for _ in range(3)]
    keys = [sessions.key_for(5, s.ref) for s in made] + [sessions.index(5)]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert sessions.replicated.unreplicated == 0  # on a cluster: each write reached a replica first
    assert all(s.id is not None and s.id[:4] == made[0].id[:4] for s in made)


async def test_ttl_is_the_smaller_of_idle_and_what_is_left_of_the_absolute_lifetime(
    sessions: Sessions, raw: aioredis.Redis, redis_prefix: str
) -> None:
    s = await ask(sessions, SessionCreate(1, {}, idle_ttl=600, absolute_ttl=3600))
    assert 599_000 < await raw.pttl(sessions.key_for(s.user_id, s.ref)) <= 600_000
    t = await ask(sessions, SessionCreate(1, {}, idle_ttl=600, absolute_ttl=100))
    assert 99_000 < await raw.pttl(sessions.key_for(t.user_id, t.ref)) <= 100_000


async def test_idle_expiry_and_touch_slides_it(sessions: Sessions) -> None:
    s = await ask(sessions, SessionCreate(1, {}, idle_ttl=1, absolute_ttl=60))
    for _ in range(3):  # touching within the idle window keeps it alive past 1 s
        await asyncio.sleep(0.5)
        await ask(sessions, SessionGet(s.id))
    await asyncio.sleep(1.2)
    with pytest.raises(SessionNotFound):
        await ask(sessions, SessionGet(s.id))


async def test_absolute_expiry_ends_a_session_however_active(sessions: Sessions) -> None:
    s = await ask(sessions, SessionCreate(1, {}, idle_ttl=1, absolute_ttl=2))
    for _ in range(3):
        await asyncio.sleep(0.5)
        await ask(sessions, SessionGet(s.id))
    await asyncio.sleep(0.7)  # past 2 s since creation
    with pytest.raises(SessionNotFound):
        await ask(sessions, SessionGet(s.id))


async def test_delete_really_deletes(
    sessions: Sessions, raw: aioredis.Redis, redis_prefix: str
) -> None:
    s = await ask(sessions, SessionCreate(3, {"a": 1}))
    assert await ask(sessions, SessionDelete(s.id))
    assert await raw.exists(sessions.key_for(s.user_id, s.ref)) == 0
    assert await raw.zscore(sessions.index(3), s.ref) is None
    with pytest.raises(SessionNotFound):
        await ask(sessions, SessionGet(s.id))
    assert not await ask(sessions, SessionDelete(s.id))


async def test_versions_refuse_a_stale_write(sessions: Sessions) -> None:
    s = await ask(sessions, SessionCreate(1, {"n": 0}))
    assert await ask(sessions, SessionUpdate(s.id, {"n": 1}, version=1)) == 2
    with pytest.raises(SessionConflict) as err:
        await ask(sessions, SessionUpdate(s.id, {"n": 99}, version=1))
    assert err.value.current == 2
    assert (await ask(sessions, SessionGet(s.id))).data == {"n": 1}
    assert await ask(sessions, SessionUpdate(s.id, {"n": 2})) == 3  # no version: last write wins


async def test_a_write_racing_a_delete_never_resurrects_the_session(
    sessions: Sessions, raw: aioredis.Redis, redis_prefix: str
) -> None:
    for _ in range(20):
        s = await ask(sessions, SessionCreate(5, {"n": 0}))
        updates = [ask(sessions, SessionUpdate(s.id, {"n": i})) for i in range(10)]
        results = await asyncio.gather(
            ask(sessions, SessionDelete(s.id)), *updates, return_exceptions=True
        )
        assert all(isinstance(r, int | SessionNotFound) for r in results)
        assert await raw.exists(sessions.key_for(s.user_id, s.ref)) == 0
        with pytest.raises(SessionNotFound):
            await ask(sessions, SessionGet(s.id))


async def test_list_and_revoke_all_of_a_users_sessions(
    sessions: Sessions, raw: aioredis.Redis, redis_prefix: str
) -> None:
    mine = [await ask(sessions, SessionCreate(11, {"device": i})) for i in range(3)]
    other = await ask(sessions, SessionCreate(12, {}))
    listed = await ask(sessions, SessionList(11))
    assert sorted(x.ref for x in listed) == sorted(x.ref for x in mine)
    assert all(x.id is None for x in listed)  # a listing never shows the bearer ids
    assert await ask(sessions, SessionRevokeAll(11)) == 3
    for s in mine:
        with pytest.raises(SessionNotFound):
            await ask(sessions, SessionGet(s.id))
    assert await raw.exists(sessions.index(11)) == 0
    assert (await ask(sessions, SessionGet(other.id))).user_id == 12


async def test_the_list_drops_sessions_that_expired_by_idleness(
    sessions: Sessions, raw: aioredis.Redis, redis_prefix: str
) -> None:
    idle = await ask(sessions, SessionCreate(21, {}, idle_ttl=1, absolute_ttl=60))
    keep = await ask(sessions, SessionCreate(21, {}))
    await until_gone(raw, sessions.key_for(idle.user_id, idle.ref))
    assert [x.ref for x in await ask(sessions, SessionList(21))] == [keep.ref]


async def test_rotation_moves_the_session_to_a_new_id_and_kills_the_old(
    sessions: Sessions, raw: aioredis.Redis, redis_prefix: str
) -> None:
    s = await ask(sessions, SessionCreate(31, {"cart": [1]}))
    rotated = await ask(sessions, SessionRotate(s.id))
    assert rotated.id is not None
    assert rotated.id != s.id
    assert rotated.data == {"cart": [1]}
    assert rotated.version == 2
    assert rotated.expires_at_ms == s.expires_at_ms  # the absolute deadline does not move
    with pytest.raises(SessionNotFound):
        await ask(sessions, SessionGet(s.id))
    # Rotation is activity: the idle TTL slides, bounded by the idle setting.
    assert 599_000 < await raw.pttl(sessions.key_for(rotated.user_id, rotated.ref)) <= 600_000
    assert [x.ref for x in await ask(sessions, SessionList(31))] == [rotated.ref]
    with pytest.raises(SessionNotFound):
        await ask(sessions, SessionRotate(s.id))


async def test_malformed_ids_look_exactly_like_unknown_ones(sessions: Sessions) -> None:
    for bad in ("", "short", "x" * 500, "has spaces in it........", "../../etc/passwd........"):
        with pytest.raises(SessionNotFound, match="no such session"):
            await ask(sessions, SessionGet(bad))


async def test_a_user_holds_at_most_max_per_user_sessions_and_the_new_one_always_stays(
    redis_url: str, raw: aioredis.Redis, redis_prefix: str
) -> None:
    actor = Sessions(
        RedisSettings(prefix=redis_prefix),
        SessionSettings(idle_ttl=600, absolute_ttl=3600, max_per_user=5),
        redis_url,
    )
    await actor.start()
    try:
        long_lived = [await ask(actor, SessionCreate(41, {}, absolute_ttl=3000)) for _ in range(5)]
        # The newest has the nearest deadline of all, and still it stays.
        newest = await ask(actor, SessionCreate(41, {}, absolute_ttl=60))
        assert (await ask(actor, SessionGet(newest.id))).user_id == 41
        listed = {s.ref for s in await ask(actor, SessionList(41))}
        assert len(listed) == 5
        assert newest.ref in listed
        gone = [s for s in long_lived if s.ref not in listed]
        assert len(gone) == 1
        assert await raw.exists(actor.key_for(gone[0].user_id, gone[0].ref)) == 0
    finally:
        await actor.stop()


async def test_a_client_asking_for_a_longer_lifetime_gets_max_ttl(
    redis_url: str, raw: aioredis.Redis, redis_prefix: str
) -> None:
    actor = Sessions(
        RedisSettings(prefix=redis_prefix),
        SessionSettings(idle_ttl=600, absolute_ttl=3600, max_ttl=120),
        redis_url,
    )
    await actor.start()
    try:
        s = await ask(actor, SessionCreate(42, {}, idle_ttl=10**9, absolute_ttl=10**9))
        assert s.expires_at_ms - s.created_ms == 120_000
        assert 0 < await raw.pttl(actor.key_for(s.user_id, s.ref)) <= 120_000
    finally:
        await actor.stop()
