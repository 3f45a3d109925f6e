"""The pubsub actor against real Redis/Valkey: confirmed subscriptions,
bounded subscribers that never slow each other, and a connection that is
replaced (with a gap notice) when Redis restarts or stops answering."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest
import redis.asyncio as aioredis

from actors import events
from actors.embedded import EMBEDDED_ACCOUNT, EmbeddedValkey, RunAs
from actors.outbox import body_of, wire
from actors.pubsub import Delivery, Publish, PubSub, RelayEvents, Subscribe, Subscriber
from config import PubSubSettings, RedisSettings
from tests.servers import Servers, make_state_dir

FAST = PubSubSettings(ping_interval=0.2, ping_timeout=0.5, reconnect_max=0.5)


async def started(url: str, prefix: str, settings: PubSubSettings = FAST) -> PubSub:
    actor = PubSub(RedisSettings(prefix=prefix, connect_timeout=2), settings, url)
    await actor.start()
    async with asyncio.timeout(10):
        while actor.snapshot()["pubsub"]["connected"] is False:
            await asyncio.sleep(0.02)
    return actor


@pytest.fixture
async def pubsub(servers: Servers, redis_prefix: str) -> AsyncIterator[PubSub]:
    actor = await started(servers.redis_url, redis_prefix)
    yield actor
    await actor.stop()


async def take(sub: Subscriber, n: int, timeout: float = 10.0) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            item = await sub.next()
            assert item is not None, sub.closed
            got.append(item)
    return got


async def test_a_message_published_after_subscribe_returns_is_delivered(
    pubsub: PubSub, raw: aioredis.Redis, redis_prefix: str
) -> None:
    sub = Subscriber("t", queue_size=10)
    await pubsub.ask(
        Subscribe(sub, channels=(f"{redis_prefix}a",), patterns=(f"{redis_prefix}p:*",)), timeout=5
    )
    await raw.publish(f"{redis_prefix}a", b"one")
    await raw.publish(f"{redis_prefix}p:x", b"two")
    await raw.publish(f"{redis_prefix}elsewhere", b"none")
    got = await take(sub, 2)
    assert [(d.channel, d.pattern, d.data) for d in got] == [
        (f"{redis_prefix}a", None, b"one"),
        (f"{redis_prefix}p:x", f"{redis_prefix}p:*", b"two"),
    ]
    receivers = await pubsub.ask(Publish(f"{redis_prefix}a", b"three"), timeout=5)
    assert receivers >= 1
    assert (await take(sub, 1))[0].data == b"three"


async def test_a_subscriber_that_cannot_keep_up_is_closed_and_never_slows_the_others(
    pubsub: PubSub, raw: aioredis.Redis, redis_prefix: str
) -> None:
    channel = f"{redis_prefix}busy"
    stalled = Subscriber("stalled", queue_size=5)
    reader = Subscriber("reader", queue_size=1000)
    for sub in (stalled, reader):
        await pubsub.ask(Subscribe(sub, channels=(channel,)), timeout=5)
    async with raw.pipeline(transaction=False) as pipe:
        for i in range(200):
            pipe.publish(channel, str(i).encode())
        await pipe.execute()
    got = await take(reader, 200)
    assert [int(d.data) for d in got] == list(range(200))
    assert stalled.closed is not None
    assert stalled.closed.startswith("too slow")
    snap = pubsub.snapshot()["pubsub"]
    assert snap["droppedSubscribers"] == 1
    assert snap["subscribers"] == 1  # the stalled one is forgotten


async def test_an_internal_subscriber_loses_messages_when_full_and_stays(
    pubsub: PubSub, raw: aioredis.Redis, redis_prefix: str
) -> None:
    channel = f"{redis_prefix}internal-ish"
    sub = Subscriber("internal", queue_size=3, overflow="drop")
    await pubsub.ask(Subscribe(sub, channels=(channel,)), timeout=5)
    for i in range(10):
        await raw.publish(channel, str(i).encode())
    async with asyncio.timeout(5):
        while sub.dropped < 7:
            await asyncio.sleep(0.01)
    assert sub.closed is None
    assert [int(d.data) for d in await take(sub, 3)] == [0, 1, 2]
    await raw.publish(channel, b"10")
    assert (await take(sub, 1))[0].data == b"10"


async def test_events_go_to_the_events_channel_and_their_kinds(
    pubsub: PubSub, redis_prefix: str
) -> None:
    sub = Subscriber("events", queue_size=10)
    await pubsub.ask(
        Subscribe(sub, channels=(f"{redis_prefix}events", f"{redis_prefix}approvals")), timeout=5
    )
    data = events.ApprovalRequested(
        approval_id=1,
        command_id=None,
        request_id=None,
        sender=None,
        action="shell_exec",
        description="",
        risk_score=95,
        risk_category="CRITICAL",
        expires_at=datetime.now(UTC),
    )
    kind, evt = events.publish(data, 7)
    assert await pubsub.ask(RelayEvents(((kind, wire(41, body_of(evt))),)), timeout=5) == 1
    got = await take(sub, 2)
    assert {d.channel for d in got} == {f"{redis_prefix}events", f"{redis_prefix}approvals"}
    assert got[0].data == got[1].data
    assert b'"type":"approval.requested"' in got[0].data
    assert msgspec.json.decode(got[0].data)["data"]["approvalId"] == 1
    assert msgspec.json.decode(got[0].data)["id"] == "41"  # the outbox id


# -- a Redis of the test's own, restarted -------------------------------------------------------
class OwnValkey:
    """A Valkey of the test's own, on a socket that survives a restart."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.server = self._new()

    def _new(self) -> EmbeddedValkey:
        return EmbeddedValkey(self.folder, run_as=RunAs.resolve(EMBEDDED_ACCOUNT), appendonly=False)

    @property
    def url(self) -> str:
        return self.server.url

    async def restart(self) -> None:
        await self.server.stop()
        self.server = self._new()
        await self.server.start()


@pytest.fixture
async def own_valkey() -> AsyncIterator[OwnValkey]:
    folder = make_state_dir("jarvisd-vk-")
    own = OwnValkey(folder)
    await own.server.start()
    try:
        yield own
    finally:
        await own.server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def test_a_restarted_redis_gives_each_subscriber_a_gap_then_new_messages(
    own_valkey: OwnValkey,
) -> None:
    actor = await started(own_valkey.url, "gap:")
    try:
        subs = [Subscriber(f"s{i}", queue_size=100) for i in range(3)]
        for sub in subs:
            await actor.ask(Subscribe(sub, channels=("gap:news",)), timeout=5)
        await own_valkey.restart()
        for sub in subs:
            down, gap = await take(sub, 2, timeout=15)  # the outage, then its end
            assert down.kind == "down"
            assert gap.kind == "gap"
            assert b"re-established" in gap.data
        client = aioredis.Redis.from_url(own_valkey.url)
        try:
            await client.publish("gap:news", b"after")
        finally:
            await client.aclose()
        for sub in subs:
            (msg,) = await take(sub, 1)
            assert (msg.kind, msg.data) == ("message", b"after")
        assert actor.snapshot()["pubsub"]["reconnects"] >= 1
    finally:
        await actor.stop()


class FreezingProxy:
    """A TCP proxy to a Redis socket whose live connections can be frozen:
    bytes stop flowing and nothing is closed (a half-open connection)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.frozen: list[asyncio.Event] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The proxy's URL, with the target's credentials (if any)."""
        userinfo = urlsplit(self.target).netloc.rpartition("@")[0]
        return f"redis://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        where = urlsplit(self.target)
        if where.scheme == "unix":
            up_r, up_w = await asyncio.open_unix_connection(where.path)
        else:
            up_r, up_w = await asyncio.open_connection(where.hostname, where.port or 6379)
        frozen = asyncio.Event()
        self.frozen.append(frozen)
        self.writers += [writer, up_w]
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if frozen.is_set():
                        await self.closing.wait()  # swallow until the end, close nothing
                        return
                    dst.write(data)
                    await dst.drain()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)

    def freeze_all(self) -> None:
        for frozen in self.frozen:
            frozen.set()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.closing.set()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_a_half_open_connection_is_noticed_by_its_heartbeat_and_replaced(
    servers: Servers, redis_prefix: str, raw: aioredis.Redis
) -> None:
    proxy = FreezingProxy(servers.redis_url)
    await proxy.start()
    actor = await started(proxy.url, redis_prefix)
    try:
        sub = Subscriber("s", queue_size=100)
        await actor.ask(Subscribe(sub, channels=(f"{redis_prefix}ho",)), timeout=5)
        proxy.freeze_all()
        down, gap = await take(sub, 2, timeout=15)  # no heartbeat back → new connection → gap
        assert (down.kind, gap.kind) == ("down", "gap")
        assert "did not come back" in actor.ps_stats.last_error
        await raw.publish(f"{redis_prefix}ho", b"still here")
        (msg,) = await take(sub, 1)
        assert msg.data == b"still here"
    finally:
        await actor.stop()
        await proxy.stop()
