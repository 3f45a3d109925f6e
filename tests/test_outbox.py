"""The event outbox: events commit with their changes and reach Redis in id
order, at least once, whoever commits them and whatever dies in between."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from config import LoadedConfig
from tests.servers import make_state_dir
from tests.test_api import Api, serve_api
from tests.test_bus_process import cli, shared_env
from tests.test_daemon_process import DaemonProcess
from tests.test_pubsub import OwnValkey, own_valkey  # noqa: F401 - the fixture


class Heard:
    """Every event on ``{prefix}events``, in the order Redis delivered them."""

    def __init__(self, raw: aioredis.Redis, prefix: str) -> None:
        self.pubsub = raw.pubsub()
        self.channel = f"{prefix}events"
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Heard:
        await self.pubsub.subscribe(self.channel)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for msg in self.pubsub.listen():
            if msg["type"] == "message":
                self.events.append(json.loads(msg["data"]))

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.pubsub.aclose()

    def ids(self) -> list[int]:
        return [int(e["id"]) for e in self.events]

    async def until(self, count: int, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while len(self.events) < count:
                await asyncio.sleep(0.02)


async def recorded(db: asyncpg.Connection, last: int) -> None:
    """The relay records how far it got with its next look (within a poll)."""
    async with asyncio.timeout(5):
        while await db.fetchval("SELECT last_id FROM event_relay WHERE name = 'redis'") != last:
            await asyncio.sleep(0.05)


@pytest.fixture
async def api(make_config: Callable[..., LoadedConfig]) -> AsyncIterator[Api]:
    async for client in serve_api(make_config()):
        yield client


async def test_events_carry_outbox_ids_and_arrive_in_id_order(
    api: Api, raw: aioredis.Redis, redis_prefix: str, pg_dsn: str
) -> None:
    _uid, token = await api.user("orderly")
    async with Heard(raw, redis_prefix) as heard:
        made = await asyncio.gather(
            *(
                api.call("POST", "/commands", token=token, json={"action": f"note_{n}"})
                for n in range(40)
            )
        )
        assert all(status == 201 for status, _h, _b in made)
        await heard.until(40)
        await asyncio.sleep(0.3)  # nothing more comes
    ids = heard.ids()
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids) == 40
    db = await asyncpg.connect(pg_dsn)
    try:
        rows = await db.fetch("SELECT id, type FROM events ORDER BY id")
        await recorded(db, ids[-1])  # how far it got, recorded with its next look
    finally:
        await db.close()
    assert [r["id"] for r in rows][-40:] == ids
    assert {e["type"] for e in heard.events} == {"command.created"}


async def test_a_change_that_fails_writes_no_event(api: Api, pg_dsn: str) -> None:
    _uid, token = await api.user("failing")
    db = await asyncpg.connect(pg_dsn)
    try:
        before = await db.fetchval("SELECT count(*) FROM events")
        # A report the state machine refuses: no change, no event.
        status, _h, made = await api.call("POST", "/commands", token=token, json={"action": "note"})
        assert status == 201
        after_create = await db.fetchval("SELECT count(*) FROM events")
        status, _h, _p = await api.call(
            "PUT",
            f"/commands/{made['id']}",
            local=True,
            json={"status": "cancelled", "reason": "x"},
        )
        assert status == 200
        status, _h, _p = await api.call(
            "PUT", f"/commands/{made['id']}", local=True, json={"status": "running"}
        )
        assert status == 409
        after = await db.fetchval("SELECT count(*) FROM events")
    finally:
        await db.close()
    assert after_create == before + 1
    assert after == after_create + 1  # the cancel, and nothing for the refused report


@pytest.fixture
def folders() -> Iterator[list[Path]]:
    made = [make_state_dir("jarvisd-outbox-") for _ in range(2)]
    yield made
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
async def test_events_committed_by_a_daemon_killed_before_relaying_reach_redis_once_in_order(
    folders: list[Path], pg_dsn: str, redis_url: str, redis_prefix: str, raw: aioredis.Redis
) -> None:
    """Daemon A commits (its relay stopped, as if killed between commit and
    relay) and is killed with -9; daemon B relays every event, once, in
    order, with the ids the outbox gave them."""
    env = shared_env(pg_dsn, redis_url, redis_prefix)
    a = DaemonProcess(folders[0], env={**env, "JARVISD_EVENTS__RELAY": "false"})
    b: DaemonProcess | None = None
    try:
        a.wait_ready(30)
        made = cli(folders[0], env, "user", "add", "k9", "--role", "user")
        assert made.returncode == 0, made.stderr
        token = cli(folders[0], env, "token", "create", "--user", "k9").stdout.strip()
        async with Heard(raw, redis_prefix) as heard, aiohttp.ClientSession() as s:
            for n in range(25):
                async with s.post(
                    f"http://127.0.0.1:{a.port}/commands",
                    json={"action": "delete_file" if n % 5 == 0 else f"note_{n}"},
                    headers={"Authorization": f"Bearer {token}"},
                ) as resp:
                    assert resp.status == 201, await resp.text()
            await asyncio.sleep(0.5)
            assert heard.events == []  # committed, not relayed
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(10)
            b = DaemonProcess(folders[1], env=env)
            b.wait_ready(30)
            await heard.until(30)  # 25 created, 5 approval.requested
            await asyncio.sleep(0.5)
            # A subscriber resuming from before all of them, on B: each once, in order.
            ws = await s.ws_connect(
                f"http://127.0.0.1:{b.port}/ws", headers={"Authorization": f"Bearer {token}"}
            )
            await ws.send_json(
                {"op": "subscribe", "channels": [f"{redis_prefix}events"], "since": 0}
            )
            resumed = [int(d["data"]["id"]) for d in await receive(ws, 30)]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.receive_json(), 0.3)  # nothing twice
            await ws.close()
        ids = heard.ids()
        assert resumed == ids
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids) == 30
        db = await asyncpg.connect(pg_dsn)
        try:
            stored = [r["id"] for r in await db.fetch("SELECT id FROM events ORDER BY id")]
        finally:
            await db.close()
        assert stored == ids
        types = [e["type"] for e in heard.events]
        assert types.count("approval.requested") == 5
    finally:
        a.stop()
        if b is not None:
            b.stop()


async def test_two_daemons_relay_through_one_leader_and_every_event_arrives_once(
    make_config: Callable[..., LoadedConfig],
    raw: aioredis.Redis,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    runners = []
    apis: list[Api] = []
    try:
        for name in ("one", "two"):
            loaded = make_config(
                daemon={"name": name, "state_dir": str(tmp_path / name)},
                http={"unix_socket": str(tmp_path / f"{name}.sock")},
            )
            runner = serve_api(loaded)
            apis.append(await runner.__anext__())
            runners.append(runner)
        leaders = [a.r.daemon.actors.relay.lead.leader for a in apis]
        assert sorted(leaders) == [False, True]
        tokens = [(await a.user(f"relay-{n}"))[1] for n, a in enumerate(apis)]
        async with Heard(raw, redis_prefix) as heard:
            for n in range(20):
                api = apis[n % 2]
                status, _h, _b = await api.call(
                    "POST", "/commands", token=tokens[n % 2], json={"action": f"a_{n}"}
                )
                assert status == 201
            await heard.until(20)
            await asyncio.sleep(0.3)
        ids = heard.ids()
        assert ids == sorted(ids)
        assert len(set(ids)) == 20
    finally:
        for runner in reversed(runners):
            with pytest.raises(StopAsyncIteration):
                await runner.__anext__()


async def test_old_relayed_events_are_pruned_and_newer_ones_kept(
    make_config: Callable[..., LoadedConfig], pg_dsn: str, raw: aioredis.Redis, redis_prefix: str
) -> None:
    loaded = make_config(events={"retention": 60})
    async for api in serve_api(loaded):
        _uid, token = await api.user("pruned")
        async with Heard(raw, redis_prefix) as heard:
            for n in range(6):
                status, _h, _b = await api.call(
                    "POST", "/commands", token=token, json={"action": f"p_{n}"}
                )
                assert status == 201
            await heard.until(6)
    db = await asyncpg.connect(pg_dsn)
    try:
        ids = [r["id"] for r in await db.fetch("SELECT id FROM events ORDER BY id")]
        old = ids[:4]
        await db.execute(
            "UPDATE events SET created_at = now() - interval '1 day' WHERE id = ANY($1::bigint[])",
            old,
        )
        async for api in serve_api(loaded):  # a new leader prunes as it starts leading
            stats = api.r.daemon.actors.relay.relay_stats
            async with asyncio.timeout(10):
                while stats.pruned < 4:
                    await asyncio.sleep(0.05)
        left = [r["id"] for r in await db.fetch("SELECT id FROM events ORDER BY id")]
    finally:
        await db.close()
    assert left == ids[4:]


async def make(api: Api, token: str, n: int) -> None:
    for i in range(n):
        status, _h, _b = await api.call("POST", "/commands", token=token, json={"action": f"x_{i}"})
        assert status == 201  # PostgreSQL alone takes the change


async def test_events_committed_while_redis_is_away_are_relayed_once_it_is_back(
    make_config: Callable[..., LoadedConfig],
    own_valkey: OwnValkey,  # noqa: F811 - the fixture
    pg_dsn: str,
) -> None:
    """Redis restarted in the middle of a stream of changes: the relay does
    not count as relayed what Redis did not take, and sends it once Redis is
    back, in order."""
    loaded = make_config(redis={"url": own_valkey.url, "connect_timeout": 1})
    db = await asyncpg.connect(pg_dsn)
    try:
        async for api in serve_api(loaded):
            relay = api.r.daemon.actors.relay.relay_stats
            _uid, token = await api.user("through-it")

            await make(api, token, 5)
            async with asyncio.timeout(10):
                while relay.last_id < await db.fetchval("SELECT max(id) FROM events"):
                    await asyncio.sleep(0.05)
            before, sent_before = relay.last_id, relay.relayed
            await own_valkey.server.stop()
            await make(api, token, 10)  # committed, each with its events, while Redis is away
            newest = await db.fetchval("SELECT max(id) FROM events")
            async with asyncio.timeout(10):
                while relay.failures == 0:
                    await asyncio.sleep(0.05)
            assert relay.last_id == before  # nothing counted as relayed
            await recorded(db, before)  # nor recorded: the events are read back, from there
            own_valkey.server = own_valkey._new()
            await own_valkey.server.start()
            listener = aioredis.Redis.from_url(own_valkey.url)
            async with Heard(listener, loaded.settings.redis.prefix) as heard:
                async with asyncio.timeout(20):
                    while relay.last_id < newest:
                        await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
            await listener.aclose()
            waiting = await db.fetchval(
                "SELECT count(*) FROM events WHERE id > $1 AND id <= $2", before, newest
            )
            assert waiting >= 10
            assert relay.relayed - sent_before == waiting  # each sent once, once Redis took it
            await recorded(db, newest)
            ids = heard.ids()  # what this listener, back in time, heard of them
            assert ids == sorted(ids)
            assert len(set(ids)) == len(ids)
            assert all(before < i <= newest for i in ids)
    finally:
        await db.close()


# -- GET /events: the log read back -----------------------------------------------------------------
async def test_the_event_log_pages_from_an_id_and_users_see_only_their_own(
    api: Api, pg_dsn: str
) -> None:
    _a, alice = await api.user("log-alice")
    _b, bob = await api.user("log-bob")
    _c, carol = await api.user("log-carol", "approver")
    for token in (alice, bob, alice):
        status, _h, _b2 = await api.call("POST", "/commands", token=token, json={"action": "n"})
        assert status == 201
    status, _h, everything = await api.call("GET", "/events?since=0", token=carol)
    assert status == 200, everything
    ids = [int(e["id"]) for e in everything["events"]]
    assert ids == sorted(ids)
    assert len(ids) == 3
    assert everything["next"] == ids[-1]
    assert everything["gap"] is False
    status, _h, mine = await api.call("GET", "/events?since=0", token=alice)
    assert [int(e["id"]) for e in mine["events"]] == [ids[0], ids[2]]  # bob's is not hers
    status, _h, first = await api.call("GET", "/events?since=0&limit=2", token=carol)
    status, _h, rest = await api.call("GET", f"/events?since={first['next']}", token=carol)
    assert [e["id"] for e in first["events"] + rest["events"]] == [str(i) for i in ids]
    status, _h, none = await api.call("GET", f"/events?since={ids[-1]}", token=carol)
    assert (none["events"], none["next"]) == ([], ids[-1])
    status, _h, only = await api.call("GET", "/events?since=0&kind=approvals", token=carol)
    assert only["events"] == []
    for bad in ("since=-1", "limit=0", "limit=1001", "wait=56", "kind=users", "x=1", "since=a"):
        status, _h, problem = await api.call("GET", f"/events?{bad}", token=carol)
        assert status == 400, (bad, problem)
    status, _h, _p = await api.call("GET", "/events")
    assert status == 401


async def test_a_long_poll_on_the_log_answers_when_an_event_commits(api: Api) -> None:
    _a, token = await api.user("poller")
    status, _h, now = await api.call("GET", "/events?since=0", token=token)
    since = now["next"]
    started = asyncio.get_running_loop().time()
    poll = asyncio.create_task(api.call("GET", f"/events?since={since}&wait=20", token=token))
    await asyncio.sleep(0.3)
    assert not poll.done()
    status, _h, made = await api.call("POST", "/commands", token=token, json={"action": "wake"})
    assert status == 201
    status, _h, woke = await poll
    took = asyncio.get_running_loop().time() - started
    assert status == 200
    assert [e["data"]["commandId"] for e in woke["events"]] == [made["id"]]
    assert took < 5, took


async def test_a_reader_older_than_what_was_pruned_is_told_of_the_gap(
    api: Api, pg_dsn: str
) -> None:
    _a, token = await api.user("late-reader")
    for _ in range(3):
        await api.call("POST", "/commands", token=token, json={"action": "n"})
    status, _h, got = await api.call("GET", "/events?since=0", token=token)
    ids = [int(e["id"]) for e in got["events"]]
    db = await asyncpg.connect(pg_dsn)
    try:
        async with db.transaction():  # what the relay's pruning does
            await db.execute("UPDATE event_relay SET last_id = $1 WHERE name = 'pruned'", ids[0])
            await db.execute("DELETE FROM events WHERE id <= $1", ids[0])
    finally:
        await db.close()
    status, _h, late = await api.call("GET", "/events?since=0", token=token)
    assert status == 200
    assert late["gap"] is True
    assert [int(e["id"]) for e in late["events"]] == ids[1:]
    _status, _h, current = await api.call("GET", f"/events?since={ids[0]}", token=token)
    assert current["gap"] is False


# -- a WebSocket resuming from an id --------------------------------------------------------------
async def resume(
    api: Api, session: aiohttp.ClientSession, token: str, channels: list[str], since: int
) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(api.base + "/ws", headers={"Authorization": f"Bearer {token}"})
    await ws.send_json({"op": "subscribe", "channels": channels, "since": since})
    reply = await asyncio.wait_for(ws.receive_json(), 10)
    assert reply["type"] == "subscribed", reply
    return ws


async def receive(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(20):
        while len(got) < n:
            doc = await ws.receive_json()
            if doc["type"] in ("message", "subscription.gap"):
                got.append(doc)
    return got


async def test_a_socket_resuming_with_since_gets_what_it_missed_then_live_with_no_gap_or_double(
    api: Api, redis_prefix: str
) -> None:
    _a, token = await api.user("resumer", "approver")
    _u, writer = await api.user("writer")
    events = f"{redis_prefix}events"
    for n in range(5):
        await api.call("POST", "/commands", token=writer, json={"action": f"before_{n}"})
    async with aiohttp.ClientSession() as s:
        ws = await resume(api, s, token, [events], 0)
        first = await receive(ws, 5)
        ids = [int(d["data"]["id"]) for d in first]
        assert ids == sorted(ids)
        assert {d["channel"] for d in first} == {events}
        # Away for a while: more commits; back with the last id seen.
        await ws.close()
        for n in range(5):
            await api.call("POST", "/commands", token=writer, json={"action": f"away_{n}"})
        ws = await resume(api, s, token, [events], ids[-1])
        missed = await receive(ws, 5)
        assert [d["data"]["data"]["action"] for d in missed] == [f"away_{n}" for n in range(5)]

        # Commits while the replay runs and after: each once, in order.
        async def keep_writing() -> None:
            for n in range(40):
                await api.call("POST", "/commands", token=writer, json={"action": f"live_{n}"})

        writing = asyncio.create_task(keep_writing())
        ws2 = await resume(api, s, token, [events, f"{redis_prefix}commands"], 0)
        await writing
        got = await receive(ws2, 2 * 50)  # every event (5 + 5 + 40) on both channels
        await asyncio.sleep(0.3)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws2.receive_json(), 0.3)  # nothing twice
        for channel in (events, f"{redis_prefix}commands"):
            seen = [int(d["data"]["id"]) for d in got if d["channel"] == channel]
            assert seen == sorted(set(seen)), channel
            assert len(seen) == 50, channel
        await ws.close()
        await ws2.close()


async def test_a_user_resuming_sees_only_their_own_and_a_pruned_past_is_a_gap(
    api: Api, redis_prefix: str, pg_dsn: str
) -> None:
    _a, alice = await api.user("resume-alice")
    _b, bob = await api.user("resume-bob")
    for token in (alice, bob, alice):
        await api.call("POST", "/commands", token=token, json={"action": "mine"})
    async with aiohttp.ClientSession() as s:
        ws = await resume(api, s, alice, [f"{redis_prefix}events"], 0)
        got = await receive(ws, 2)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.receive_json(), 0.5)  # not bob's
        await ws.close()
        first = int(got[0]["data"]["id"])
        db = await asyncpg.connect(pg_dsn)
        try:
            async with db.transaction():  # what the relay's pruning does
                await db.execute("UPDATE event_relay SET last_id = $1 WHERE name = 'pruned'", first)
                await db.execute("DELETE FROM events WHERE id <= $1", first)
        finally:
            await db.close()
        ws = await resume(api, s, alice, [f"{redis_prefix}events"], 0)
        gap, again = await receive(ws, 2)
        assert gap["type"] == "subscription.gap"
        assert "pruned" in gap["reason"]
        assert again["data"]["id"] == got[1]["data"]["id"]
        await ws.close()


async def test_a_subscriber_resuming_after_a_redis_restart_mid_stream_sees_every_event_once(
    make_config: Callable[..., LoadedConfig],
    own_valkey: OwnValkey,  # noqa: F811 - the fixture
    pg_dsn: str,
) -> None:
    """A client follows the events over a WebSocket while commands keep
    coming; Redis restarts in the middle. On the gap notice it reconnects
    with the last id it saw: it ends with every event, once each, in order."""
    loaded = make_config(redis={"url": own_valkey.url, "connect_timeout": 1})
    events = f"{loaded.settings.redis.prefix}events"
    async for api in serve_api(loaded):
        _a, token = await api.user("follower", "approver")
        _u, writer = await api.user("steady")
        seen: list[int] = []

        async with aiohttp.ClientSession() as s:
            ws = await resume(api, s, token, [events], 0)
            writing = asyncio.create_task(keep_writing(api, writer, 60))
            restarted = False
            reconnects = 0
            async with asyncio.timeout(60):
                while not (writing.done() and seen and seen[-1] == await newest(pg_dsn)):
                    if not restarted and len(seen) >= 20:
                        await own_valkey.restart()  # in the middle of the stream
                        restarted = True
                    try:
                        doc = await ws.receive_json(timeout=0.5)
                    except TimeoutError:
                        continue
                    except TypeError:  # the socket closed (a close frame is not JSON)
                        doc = {"type": "closed"}
                    if doc["type"] == "message":
                        seen.append(int(doc["data"]["id"]))
                    elif doc["type"] in ("subscription.gap", "closed"):
                        # What a client does: back with the last id it saw.
                        await ws.close()
                        reconnects += 1
                        ws = await resume_when_back(
                            api, s, token, [events], seen[-1] if seen else 0
                        )
            await writing
            await ws.close()
        assert restarted
        assert reconnects >= 1  # the restart was noticed
        db = await asyncpg.connect(pg_dsn)
        try:
            ids = [r["id"] for r in await db.fetch("SELECT id FROM events ORDER BY id")]
        finally:
            await db.close()
        assert seen == ids  # every event, exactly once, in id order


async def resume_when_back(
    api: Api, session: aiohttp.ClientSession, token: str, channels: list[str], since: int
) -> aiohttp.ClientWebSocketResponse:
    """What a client does while Redis is still away: try again until subscribed."""
    async with asyncio.timeout(20):
        while True:
            ws = await session.ws_connect(
                api.base + "/ws", headers={"Authorization": f"Bearer {token}"}
            )
            await ws.send_json({"op": "subscribe", "channels": channels, "since": since})
            reply = await asyncio.wait_for(ws.receive_json(), 10)
            if reply["type"] == "subscribed":
                return ws
            await ws.close()
            await asyncio.sleep(0.2)


async def keep_writing(api: Api, token: str, n: int) -> None:
    for i in range(n):
        status, _h, _b = await api.call("POST", "/commands", token=token, json={"action": f"s_{i}"})
        assert status == 201
        await asyncio.sleep(0.03)


async def newest(dsn: str) -> int:
    db = await asyncpg.connect(dsn)
    try:
        return int(await db.fetchval("SELECT coalesce(max(id), 0) FROM events"))
    finally:
        await db.close()
