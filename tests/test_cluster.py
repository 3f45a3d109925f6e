"""Failures of a Redis Cluster under running daemons: a primary killed
(kill -9) under load, slots moved to another primary under load, and the
pub/sub listener's node going away or cut off from the cluster bus. Each
test has a cluster of its own, since it breaks it. None of it may cost a
daemon a crash, a restart or an acknowledged write."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from actors.embedded.binaries import find_valkey_cli
from actors.pubsub import PubSub, Subscribe, Subscriber
from actors.redis_link import connect_redis
from actors.sessions import user_tag
from config import LoadedConfig, PubSubSettings, RedisSettings
from tests.cluster import LocalCluster
from tests.test_api import Api
from tests.test_http import start_daemon

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture
def own_cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def two_daemons(
    own_cluster: LocalCluster, make_config: Callable[..., LoadedConfig], tmp_path: Path
) -> AsyncIterator[list[Api]]:
    """Two daemons on one PostgreSQL database and one Redis Cluster."""
    apis: list[Api] = []
    runners = []
    try:
        for name in ("a", "b"):
            loaded = make_config(
                daemon={"name": name, "state_dir": str(tmp_path / name)},
                http={"unix_socket": str(tmp_path / f"{name}.sock")},
                redis={"url": own_cluster.url},
                sessions={"max_per_user": 100_000},  # the load makes thousands; all must stay
            )
            runner = start_daemon(loaded)
            running = await runner.__anext__()
            runners.append(runner)
            await running.wait_ready()
            path = loaded.settings.http.unix_socket
            assert path is not None
            apis.append(Api(running, path))
        yield apis
    finally:
        for api in apis:
            await api.unix.close()
        for runner in reversed(runners):
            with pytest.raises(StopAsyncIteration):
                await runner.__anext__()


class Load:
    """Cache writes and reads and session creations from several workers on
    each daemon, each outcome recorded with its time."""

    def __init__(self, apis: list[Api], tokens: list[str], user_id: int) -> None:
        self.apis = apis
        self.tokens = tokens
        self.user_id = user_id
        self.outcomes: list[tuple[float, str, int]] = []  # (time, what, status)
        self.sessions: list[tuple[int, str, Any]] = []  # (daemon, id, data)
        self.sets: list[tuple[int, str, int]] = []  # (daemon, key, value) acknowledged
        self.stop = asyncio.Event()
        self.odd: list[tuple[str, int, Any]] = []  # answers other than ok, miss or 503

    async def worker(self, n: int, daemon: int) -> None:
        api, token = self.apis[daemon], self.tokens[daemon]
        i = 0
        while not self.stop.is_set():
            i += 1
            key = f"w{n}-{i}"
            for what, method, path, body in (
                ("set", "POST", "/cache/set", {"key": key, "value": i, "ttl": 60}),
                ("get", "GET", f"/cache/get/{key}", None),
                ("session", "POST", "/sessions", {"userId": self.user_id, "data": [n, i]}),
            ):
                try:
                    status, _h, doc = await api.call(method, path, token=token, json=body)
                except aiohttp.ClientError as exc:
                    status, doc = 0, repr(exc)
                self.outcomes.append((time.monotonic(), what, status))
                if status not in (200, 201, 404, 503):
                    self.odd.append((what, status, doc))
                if what == "session" and status == 201:
                    self.sessions.append((daemon, doc["id"], [n, i]))
                if what == "set" and status == 200:
                    self.sets.append((daemon, key, i))
            await asyncio.sleep(0.005)

    def failures(self, since: float = 0.0) -> list[tuple[float, str, int]]:
        ok = {"set": 200, "get": 200, "session": 201}  # (a get after a failed set: 404)
        return [o for o in self.outcomes if o[0] >= since and o[2] != ok.get(o[1], -1)]

    def done(self, since: float) -> set[str]:
        """The kinds of request answered as they should be since ``since``."""
        ok = {"set": 200, "get": 200, "session": 201}
        return {what for t, what, status in self.outcomes if t >= since and status == ok[what]}

    async def lost(self) -> list[Any]:
        """Acknowledged sessions and cache values that cannot be read back."""
        missing: list[Any] = []
        for n, (daemon, session_id, data) in enumerate(self.sessions):
            api = self.apis[n % 2]
            status, _h, doc = await api.call(
                "GET", f"/sessions/{session_id}", token=self.tokens[daemon]
            )
            if status != 200 or doc["data"] != data:
                missing.append(("session", status, doc, data))
        for n, (daemon, key, value) in enumerate(self.sets):
            api = self.apis[n % 2]
            status, _h, doc = await api.call("GET", f"/cache/get/{key}", token=self.tokens[daemon])
            if status != 200 or doc["value"] != value:
                missing.append(("cache", key, status, doc, value))
        return missing


def no_crash_nor_restart(apis: list[Api]) -> None:
    for api in apis:
        broken = {
            a.name: (a.stats.crashes, a.stats.restarts)
            for a in api.r.daemon.supervisor.actors
            if a.stats.crashes or a.stats.restarts
        }
        assert broken == {}, broken
        assert not api.r.task.done()


async def until(check: Any, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


async def test_a_primary_killed_under_load_fails_requests_only_for_the_failover_then_all_recover(
    own_cluster: LocalCluster, two_daemons: list[Api]
) -> None:
    tokens = [(await api.user(f"load-{n}", "agent"))[1] for n, api in enumerate(two_daemons)]
    owner, _token = await two_daemons[0].user("owner")
    load = Load(two_daemons, tokens, owner)
    workers = [asyncio.create_task(load.worker(n, n % 2)) for n in range(8)]
    try:
        await until(lambda: len(load.outcomes) >= 300, 30, "the load to run")
        assert not load.failures(), load.failures()[:5]
        # The primary holding the owner's sessions (one hash tag: one slot).
        victim = own_cluster.primary_of_slot(key_slot(user_tag(owner).encode()))
        killed_at = time.monotonic()
        own_cluster.kill(victim)
        await asyncio.to_thread(own_cluster.wait_failover, victim)
        promoted_at = time.monotonic()
        # Back without a restart: every kind of request succeeds again, and
        # then keeps succeeding.
        await until(lambda: load.done(promoted_at) == {"set", "get", "session"}, 15, "recovery")
        recovered_at = time.monotonic()
        seen = len(load.outcomes)
        await until(lambda: len(load.outcomes) >= seen + 300, 20, "more load after")
    finally:
        load.stop.set()
        await asyncio.gather(*workers)
    failures = load.failures(killed_at)
    statuses = {status for _t, _what, status in failures}
    # Writes answer 503 while their slots have no primary, reads are misses
    # (404; or the set before them failed); never a 500.
    assert statuses <= {503, 404}, load.odd[:5]
    last_failure = max((t for t, _w, _s in failures), default=killed_at)
    failover = promoted_at - killed_at
    window = last_failure - killed_at
    assert window <= failover + 5.0, (window, failover, failures[-5:])
    assert not load.failures(recovered_at), load.failures(recovered_at)[:5]
    print(
        f"failover {failover:.2f} s; requests failed for {window:.2f} s "
        f"({len(failures)} of {len(load.outcomes)}); {len(load.sessions)} sessions acknowledged"
    )
    # Every session that was acknowledged is still there, on either daemon.
    lost = [item for item in await load.lost() if item[0] == "session"]
    assert not lost, (len(lost), lost[:3])
    for api in two_daemons:
        await api.r.wait_ready(10)
    no_crash_nor_restart(two_daemons)


async def test_the_pubsub_listener_moves_to_another_node_when_its_node_dies(
    own_cluster: LocalCluster,
) -> None:
    settings = PubSubSettings(ping_interval=0.5, ping_timeout=3.0, reconnect_max=0.5)
    actor = PubSub(RedisSettings(prefix="mv:", connect_timeout=1), settings, own_cluster.url)
    await actor.start()
    publisher = connect_redis(own_cluster.url)
    assert isinstance(publisher, RedisCluster)
    try:
        async with asyncio.timeout(10):
            while not actor.snapshot()["pubsub"]["connected"]:
                await asyncio.sleep(0.02)
        sub = Subscriber("s", queue_size=100)
        await actor.ask(Subscribe(sub, channels=("mv:ch",)), timeout=5)
        # Published through any node, heard on the listener's.
        for n in range(20):
            await publisher.publish("mv:ch", f"m{n}")
        got = [await asyncio.wait_for(sub.next(), 5) for _ in range(20)]
        assert [d.data for d in got if d is not None] == [f"m{n}".encode() for n in range(20)]
        node = actor.snapshot()["pubsub"]["node"]
        own_cluster.kill(int(node.rsplit(":", 1)[1]))
        down = await asyncio.wait_for(sub.next(), 10)
        gap = await asyncio.wait_for(sub.next(), 20)
        assert (down and down.kind, gap and gap.kind) == ("down", "gap")
        assert actor.snapshot()["pubsub"]["node"] != node
        async with asyncio.timeout(30):  # the publisher too finds its way after the failover
            while True:
                try:
                    await publisher.publish("mv:ch", "after")
                    break
                except Exception:
                    await asyncio.sleep(0.2)
        item = await asyncio.wait_for(sub.next(), 10)
        assert item is not None
        assert item.data == b"after"
    finally:
        await publisher.aclose()
        await actor.stop()


async def test_slots_moved_to_another_primary_under_load_answer_no_500_and_lose_nothing(
    own_cluster: LocalCluster, two_daemons: list[Api]
) -> None:
    """Resharding (valkey-cli --cluster reshard: MIGRATING/IMPORTING, MIGRATE,
    SETSLOT NODE) while both daemons set and read cache keys and make
    sessions: redis-py follows ASK and MOVED, the sessions' replicated writes
    follow them too; a request may answer 503 while its keys are split
    between two nodes, never 500, and nothing acknowledged is lost."""
    tokens = [(await api.user(f"move-{n}", "agent"))[1] for n, api in enumerate(two_daemons)]

    def slots_to_move(user_id: int) -> int:
        """How many slots move so that this user's sessions change node."""
        slot = key_slot(user_tag(user_id).encode())
        return sum(1 for s in own_cluster.slots_of(own_cluster.primary_of_slot(slot)) if s <= slot)

    # An owner whose sessions' slot lies 300 to 1,000 slots into its node's
    # range: long enough a migration under load, short enough a test (about
    # one user in eight qualifies).
    for n in range(100):
        owner, _token = await two_daemons[0].user(f"mover-{n}")
        if 300 <= slots_to_move(owner) <= 1000:
            break
    assert 300 <= slots_to_move(owner) <= 1000
    load = Load(two_daemons, tokens, owner)
    workers = [asyncio.create_task(load.worker(n, n % 2)) for n in range(8)]
    cli = find_valkey_cli()
    assert cli is not None
    # The source's slots up to the owner's sessions' one move to another
    # primary (valkey-cli takes a node's slots from its first one on).
    owner_slot = key_slot(user_tag(owner).encode())
    source = own_cluster.primary_of_slot(owner_slot)
    target = next(p for p in own_cluster.primaries() if p != source)
    ids = {port: own_cluster.node_id(port) for port in (source, target)}
    count = slots_to_move(owner)
    try:
        await until(lambda: len(load.outcomes) >= 300, 30, "the load to run")
        started = time.monotonic()
        moved = await asyncio.to_thread(
            subprocess.run,
            [
                str(cli),
                "--cluster",
                "reshard",
                f"127.0.0.1:{source}",
                "--cluster-from",
                ids[source],
                "--cluster-to",
                ids[target],
                "--cluster-slots",
                str(count),
                "--cluster-yes",
                "--cluster-pipeline",
                "50",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert moved.returncode == 0, moved.stdout[-2000:] + moved.stderr[-2000:]
        finished = time.monotonic()
        assert own_cluster.primary_of_slot(owner_slot) == target
        seen = len(load.outcomes)
        await until(lambda: len(load.outcomes) >= seen + 300, 20, "more load after")
    finally:
        load.stop.set()
        await asyncio.gather(*workers)
    during = [o for o in load.outcomes if started <= o[0] <= finished]
    assert during, "the load ran while the slots moved"
    assert not load.odd, load.odd[:5]  # nothing but ok, miss (after a 503) or 503
    assert {status for _t, _w, status in load.failures()} <= {503, 404}
    lost = await load.lost()
    assert not lost, (len(lost), lost[:3])
    print(
        f"{count} slots moved in {finished - started:.2f} s under load: "
        f"{len(during)} requests meanwhile, {len(load.failures(started))} not ok (503/404), "
        f"{len(load.sessions)} sessions and {len(load.sets)} cache values acknowledged, none lost"
    )
    no_crash_nor_restart(two_daemons)


async def test_a_listener_node_cut_from_the_cluster_bus_is_noticed_and_left(
    own_cluster: LocalCluster,
) -> None:
    """A node that no longer takes part in the cluster bus still answers PING
    on the listener's connection, but hears nothing published elsewhere. The
    listener's heartbeat, published on another node, does not come back: the
    listener tells its subscribers "down" (the caches that need it stop
    serving), moves to another node and tells them "gap"."""
    settings = PubSubSettings(ping_interval=0.3, ping_timeout=1.0, reconnect_max=0.5)
    actor = PubSub(RedisSettings(prefix="cut:", connect_timeout=1), settings, own_cluster.url)
    await actor.start()
    publisher = connect_redis(own_cluster.url)
    assert isinstance(publisher, RedisCluster)
    try:
        async with asyncio.timeout(10):
            while not actor.snapshot()["pubsub"]["heartbeats"]:
                await asyncio.sleep(0.02)
        sub = Subscriber("s", queue_size=100)
        await actor.ask(Subscribe(sub, channels=("cut:ch",)), timeout=5)
        node = actor.snapshot()["pubsub"]["node"]
        port = int(node.rsplit(":", 1)[1])
        # Cut off: the node forgets the cluster (it answers clients, and drops
        # what the other nodes send it, PUBLISH included, from nodes it no
        # longer knows).
        with own_cluster.client(port) as c:
            c.execute_command("FLUSHALL")
            c.execute_command("CLUSTER", "RESET", "SOFT")
            assert c.ping()
        down = await asyncio.wait_for(sub.next(), 15)
        assert down is not None
        assert down.kind == "down"
        assert "heartbeat" in down.data.decode()
        gap = await asyncio.wait_for(sub.next(), 20)
        assert gap is not None
        assert gap.kind == "gap"
        stats = actor.snapshot()["pubsub"]
        assert stats["node"] != node
        assert stats["deaf"] >= 1
        async with asyncio.timeout(30):  # heard again: a message published on any node
            while True:
                with contextlib.suppress(Exception):  # the cluster is failing the node over
                    await publisher.publish("cut:ch", "after")
                try:
                    item = await asyncio.wait_for(sub.next(), 1)
                except TimeoutError:
                    continue
                if item is not None and item.kind == "message":
                    assert item.data == b"after"
                    break
        assert actor.stats.crashes == 0
    finally:
        await publisher.aclose()
        await actor.stop()
