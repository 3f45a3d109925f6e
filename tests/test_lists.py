"""The list cache: a repeated GET /commands or /approvals is served from
memory, and any change, made here or announced by another daemon, is seen at
once (here) or within the pub/sub latency (there)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from config import LoadedConfig
from tests.test_api import Api
from tests.test_http import start_daemon


@pytest.fixture
async def pair(
    make_config: Callable[..., LoadedConfig], tmp_path: Path
) -> AsyncIterator[tuple[Api, Api]]:
    first = make_config(bus={"shared_inbox": True})
    second = make_config(
        bus={"shared_inbox": True},
        daemon={"state_dir": str(tmp_path / "second")},
        http={"unix_socket": str(tmp_path / "second.sock")},
    )
    async for a in start_daemon(first):
        async for b in start_daemon(second):
            await a.wait_ready()
            await b.wait_ready()
            api_a = Api(a, str(first.settings.http.unix_socket))
            api_b = Api(b, str(second.settings.http.unix_socket))
            async with asyncio.timeout(10):
                while not (a.daemon.runtime.lists.enabled and b.daemon.runtime.lists.enabled):
                    await asyncio.sleep(0.02)
            try:
                yield api_a, api_b
            finally:
                await api_a.unix.close()
                await api_b.unix.close()


async def ids(api: Api, token: str, path: str = "/commands") -> list[int]:
    status, _h, page = await api.call("GET", path, token=token)
    assert status == 200, page
    return [c["id"] for c in page["items"]]


async def test_a_repeated_query_comes_from_memory_and_a_change_here_shows_at_once(
    pair: tuple[Api, Api],
) -> None:
    a, _b = pair
    _ag, agent = await a.user("lister", "agent")
    lists = a.r.daemon.runtime.lists
    assert await ids(a, agent) == []
    hits = lists.hits
    assert await ids(a, agent) == []
    assert lists.hits == hits + 1
    _s, _h, made = await a.call("POST", "/commands", token=agent, json={"action": "x"})
    assert await ids(a, agent) == [made["id"]]  # no wait: dropped before the POST answered
    _s, _h, _r = await a.call(
        "PUT", f"/commands/{made['id']}", token=agent, json={"status": "running"}
    )
    _s, _h, page = await a.call("GET", "/commands", token=agent)
    assert page["items"][0]["status"] == "running"


async def test_a_users_cached_list_is_never_anyone_elses(pair: tuple[Api, Api]) -> None:
    a, _b = pair
    _one, one = await a.user("scope-one")
    _two, two = await a.user("scope-two")
    assert await ids(a, one) == []
    _s, _h, theirs = await a.call("POST", "/commands", token=two, json={"action": "x"})
    assert await ids(a, one) == []
    assert await ids(a, two) == [theirs["id"]]


async def test_a_change_made_by_another_daemon_or_the_bus_shows_within_a_second(
    pair: tuple[Api, Api], raw: aioredis.Redis
) -> None:
    a, b = pair
    _ag, agent = await a.user("watcher", "agent")
    assert await ids(a, agent) == []
    _s, _h, made = await b.call("POST", "/commands", token=agent, json={"action": "y"})
    started = time.monotonic()
    while await ids(a, agent) != [made["id"]]:
        assert time.monotonic() - started < 1.0
        await asyncio.sleep(0.01)
    envelope = {"v": 1, "id": "via-bus", "type": "command.requested", "data": {"action": "z"}}
    await raw.xadd(a.r.daemon.settings.inbox, {"envelope": json.dumps(envelope)})
    started = time.monotonic()
    while len(await ids(a, agent)) != 2:
        assert time.monotonic() - started < 5.0
        await asyncio.sleep(0.02)


async def test_without_pubsub_lists_are_not_cached(pair: tuple[Api, Api]) -> None:
    a, _b = pair
    _ag, agent = await a.user("plain-lister", "agent")
    await a.r.daemon.supervisor.get("pubsub").stop()
    lists = a.r.daemon.runtime.lists
    assert not lists.enabled
    hits = lists.hits
    assert await ids(a, agent) == []
    assert await ids(a, agent) == []
    assert lists.hits == hits
