"""POST /publish and GET /ws on an in-process daemon: who may publish where,
what each role sees, slow clients, and a Redis restart under subscribers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from actors import MailboxFull
from actors.pubsub import CLIENTS_PUBSUB, Publish
from actors.redis_link import RedisUnavailable
from config import LoadedConfig
from tests.servers import SINGLE_AND_CLUSTER, redis_url_for
from tests.test_api import Api, serve_api
from tests.test_http import start_daemon
from tests.test_pubsub import OwnValkey, own_valkey  # noqa: F401 - the fixture


@pytest.fixture(params=SINGLE_AND_CLUSTER)
def redis_url(request: pytest.FixtureRequest) -> str:
    """Every test here runs on one server and again on a Redis Cluster."""
    return redis_url_for(request)


# The pass-through channels these tests publish and subscribe on (pubsub.channels).
CHANNELS = ["user_activity", "sensor.*", "big", "x", "firehose", "news"]
FAST_PUBSUB = {
    "ping_interval": 0.3,
    "ping_timeout": 1.0,
    "reconnect_max": 0.5,
    "channels": CHANNELS,
}


@pytest.fixture
def overrides() -> dict[str, dict[str, Any]]:
    return {}


@pytest.fixture
async def api(
    make_config: Callable[..., LoadedConfig], overrides: dict[str, dict[str, Any]]
) -> AsyncIterator[Api]:
    sections = {"pubsub": FAST_PUBSUB, **overrides}
    loaded = make_config(**sections)
    async for client in serve_api(loaded):
        yield client


def prefix_of(api: Api) -> str:
    return api.r.daemon.settings.redis.prefix


async def connect(
    api: Api, token: str | None, session: aiohttp.ClientSession
) -> aiohttp.ClientWebSocketResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await session.ws_connect(api.base + "/ws", headers=headers)


async def subscribe(
    ws: aiohttp.ClientWebSocketResponse,
    channels: tuple[str, ...] = (),
    patterns: tuple[str, ...] = (),
) -> dict[str, Any]:
    await ws.send_json({"op": "subscribe", "channels": channels, "patterns": patterns})
    reply: dict[str, Any] = await asyncio.wait_for(ws.receive_json(), 10)
    return reply


async def messages(
    ws: aiohttp.ClientWebSocketResponse, n: int, timeout: float = 10
) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            doc = await ws.receive_json()
            if doc["type"] in ("message", "subscription.gap"):
                got.append(doc)
    return got


async def nothing_more(ws: aiohttp.ClientWebSocketResponse, wait: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.receive_json(), wait)


async def publish(api: Api, token: str, channel: str, message: Any) -> tuple[int, Any]:
    status, _h, body = await api.call(
        "POST", "/publish", token=token, json={"channel": channel, "message": message}
    )
    return status, body


# -- POST /publish ------------------------------------------------------------------------------
async def test_publish_is_for_admins_and_agents_and_never_on_the_daemons_channels(api: Api) -> None:
    prefix = prefix_of(api)
    _a, agent = await api.user("pub-agent", "agent")
    _u, user = await api.user("pub-user")
    _p, approver = await api.user("pub-approver", "approver")
    assert (await publish(api, agent, "user_activity", {"login": "ada"}))[0] == 200
    for channel in (
        f"{prefix}events",
        f"{prefix}approvals",
        f"{prefix}internal:x",
        f"{prefix}anything",
        api.r.daemon.settings.inbox,  # commands come by POST /commands or an agent's own inbox
        "other-instance:inbox",  # nothing outside pubsub.channels
        "other-instance:events",
    ):
        status, problem = await publish(api, agent, channel, {"forged": True})
        assert status == 403, channel
        assert "pubsub.channels" in problem["detail"]
    for token in (user, approver):
        assert (await publish(api, token, "user_activity", 1))[0] == 403
    assert (await api.call("POST", "/publish", json={"channel": "x", "message": 1}))[0] == 401
    for bad in ("", "has space", "a" * 201, "glob*", "nul\u0000"):
        assert (await publish(api, agent, bad, 1))[0] == 400, bad
    status, _b = await publish(api, agent, "big", "x" * 70_000)
    assert status == 413


# -- GET /ws -------------------------------------------------------------------------------------
async def test_a_client_receives_what_it_subscribed_to_by_channel_and_pattern(api: Api) -> None:
    _a, agent = await api.user("ws-agent", "agent")
    async with aiohttp.ClientSession() as s:
        ws = await connect(api, agent, s)
        reply = await subscribe(ws, ("user_activity",), ("sensor.*",))
        assert reply == {
            "type": "subscribed",
            "channels": ["user_activity"],
            "patterns": ["sensor.*"],
        }
        await publish(api, agent, "user_activity", {"user": "ada", "did": "login"})
        await publish(api, agent, "sensor.kitchen", {"t": 21.5})
        await publish(api, agent, "unrelated", 1)
        got = await messages(ws, 2)
        assert got[0] == {
            "type": "message",
            "channel": "user_activity",
            "pattern": None,
            "data": {"user": "ada", "did": "login"},
        }
        assert (got[1]["channel"], got[1]["pattern"], got[1]["data"]) == (
            "sensor.kitchen",
            "sensor.*",
            {"t": 21.5},
        )
        await nothing_more(ws)
        await ws.send_json({"op": "unsubscribe", "channels": ["user_activity"]})
        assert (await ws.receive_json())["type"] == "unsubscribed"
        await publish(api, agent, "user_activity", 2)
        await nothing_more(ws)
        await ws.send_json({"op": "ping"})
        assert await ws.receive_json() == {"type": "pong"}
        await ws.send_str("not json")
        assert (await ws.receive_json())["type"] == "error"
        await ws.close()


async def test_a_user_sees_only_events_about_their_own_commands(api: Api) -> None:
    prefix = prefix_of(api)
    _m, mine = await api.user("ws-owner")
    _o, other = await api.user("ws-other")
    async with aiohttp.ClientSession() as s:
        ws = await connect(api, mine, s)
        refused = await subscribe(
            ws,
            (
                "user_activity",
                f"{prefix}inbox",
            ),
            ("*",),
        )
        assert refused["type"] == "error"
        assert set(refused["refused"]) == {"user_activity", f"{prefix}inbox", "*"}
        assert (await subscribe(ws, (f"{prefix}commands",)))["type"] == "subscribed"
        await api.call("POST", "/commands", token=other, json={"action": "theirs"})
        _s, _h, own = await api.call("POST", "/commands", token=mine, json={"action": "mine"})
        (event,) = await messages(ws, 1)
        assert event["data"]["type"] == "command.created"
        assert event["data"]["data"]["commandId"] == own["id"]
        await nothing_more(ws)
        await ws.close()


async def test_internal_channels_are_never_delivered_even_through_a_pattern(api: Api) -> None:
    prefix = prefix_of(api)
    async with aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=api.r.daemon.settings.http.unix_socket or "")
    ) as local:
        ws = await local.ws_connect("http://localhost/ws")  # the local admin
        refused = await subscribe(ws, (f"{prefix}internal:pubsub",))
        assert refused["type"] == "error"
        assert (await subscribe(ws, (), (f"{prefix}*",)))["type"] == "subscribed"
        pubsub = api.r.daemon.supervisor.get("pubsub")
        await pubsub.ask(Publish(f"{prefix}internal:secret", b'{"x":1}'), timeout=5)
        await pubsub.ask(Publish(f"{prefix}visible", b'{"y":2}'), timeout=5)
        (got,) = await messages(ws, 1)
        assert got["channel"] == f"{prefix}visible"
        await ws.close()


async def test_a_client_without_headers_authenticates_with_its_first_frame(api: Api) -> None:
    _a, agent = await api.user("ws-first", "agent")
    async with aiohttp.ClientSession() as s:
        ws = await connect(api, None, s)
        await ws.send_json({"op": "auth", "token": agent})
        assert (await ws.receive_json())["type"] == "authenticated"
        assert (await subscribe(ws, ("x",)))["type"] == "subscribed"
        await ws.close()
        bad = await connect(api, None, s)
        await bad.send_json({"op": "auth", "token": "jv_not-a-token"})
        msg = await bad.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert bad.close_code == 1008
        nosy = await connect(api, None, s)
        await nosy.send_json({"op": "subscribe", "channels": ["x"]})
        await nosy.receive()
        assert nosy.close_code == 1008
    # Not an upgrade: 400 before any credential is looked up; an upgrade with
    # bad credentials: 401.
    status, _h, _b = await api.call("GET", "/ws", headers={"Authorization": "Bearer jv_nope"})
    assert status == 400
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(
                api.base.replace("http", "ws") + "/ws", headers={"Authorization": "Bearer jv_nope"}
            )
    assert refused.value.status == 401


@pytest.mark.parametrize("overrides", [{"pubsub": {**FAST_PUBSUB, "client_buffer_bytes": 200_000}}])
async def test_one_stalled_client_is_dropped_with_1013_and_never_delays_the_others(
    api: Api,
) -> None:
    _a, agent = await api.user("ws-fast", "agent")
    payload = "x" * 60_000
    async with aiohttp.ClientSession() as s:
        stalled = await connect(api, agent, s)
        await subscribe(stalled, ("firehose",))
        readers = [await connect(api, agent, s) for _ in range(5)]
        for ws in readers:
            await subscribe(ws, ("firehose",))
        pubsub = api.r.daemon.supervisor.get(CLIENTS_PUBSUB)

        async def read_all(ws: aiohttp.ClientWebSocketResponse) -> int:
            return len(await messages(ws, 300, timeout=30))

        reading = [asyncio.create_task(read_all(ws)) for ws in readers]
        for i in range(300):
            await pubsub.ask(
                Publish("firehose", json.dumps({"n": i, "pad": payload}).encode()), timeout=5
            )
            # Paced (9 MB/s a reader), so that readers sharing this busy test
            # process keep up, while the stalled one's 18 MB never fit its buffers.
            await asyncio.sleep(0.005)
        assert await asyncio.gather(*reading) == [300] * 5
        snap = pubsub.snapshot()["pubsub"]
        assert snap["droppedSubscribers"] == 1
        # The stalled client, reading at last, finds the close it was sent (or a cut connection).
        async with asyncio.timeout(20):
            while not stalled.closed:
                msg = await stalled.receive()
                if msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    break
        assert stalled.close_code in (1013, 1006, None)
        for ws in readers:
            await ws.close()
    _s, _h, stats = await api.call("GET", "/stats", local=True)
    assert stats["actors"][CLIENTS_PUBSUB]["pubsub"]["droppedSubscribers"] == 1


async def test_a_redis_restart_gives_subscribed_clients_a_gap_then_new_messages(
    make_config: Callable[..., LoadedConfig],
    own_valkey: OwnValkey,  # noqa: F811
) -> None:
    loaded = make_config(redis={"url": own_valkey.url}, pubsub=FAST_PUBSUB)
    async for running in start_daemon(loaded):
        await running.wait_ready()
        assert loaded.settings.http.unix_socket is not None
        connector = aiohttp.UnixConnector(path=loaded.settings.http.unix_socket)
        async with aiohttp.ClientSession(connector=connector) as local:
            clients = [await local.ws_connect("http://localhost/ws") for _ in range(3)]
            for ws in clients:
                await subscribe(ws, ("news",))
            await own_valkey.restart()
            for ws in clients:
                (gap,) = await messages(ws, 1, timeout=20)
                assert gap["type"] == "subscription.gap"
            pubsub = running.daemon.supervisor.get("pubsub")
            async with asyncio.timeout(10):
                while True:
                    try:
                        await pubsub.ask(Publish("news", b'"after"'), timeout=2)
                        break
                    except Exception:
                        await asyncio.sleep(0.1)
            for ws in clients:
                (msg,) = await messages(ws, 1)
                assert msg["data"] == "after"
                await ws.close()
        await running.wait_ready()


# -- what a socket costs ------------------------------------------------------------------------
@pytest.mark.parametrize("redis_url", ["single"], indirect=True)
async def test_an_idle_subscribed_socket_holds_no_task_of_its_own(api: Api) -> None:
    """Thousands of sockets on one daemon: each holds only aiohttp's own
    task for its connection; its helpers are made when they have work."""
    _a, agent = await api.user("idle-agent", "agent")
    async with aiohttp.ClientSession() as session:
        warm = await connect(api, agent, session)
        assert (await subscribe(warm, ("user_activity",)))["type"] == "subscribed"
        await asyncio.sleep(0.2)
        before = len(asyncio.all_tasks())
        sockets = [await connect(api, agent, session) for _ in range(20)]
        for ws in sockets:
            assert (await subscribe(ws, ("user_activity",)))["type"] == "subscribed"
        await asyncio.sleep(0.2)
        # None of the session's helpers runs (they were four a socket), and
        # the tasks added are at most aiohttp's, one a connection, here and
        # on the client's side.
        assert [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("ws.")] == []
        assert len(asyncio.all_tasks()) - before <= 2 * len(sockets)
        assert (await publish(api, agent, "user_activity", {"n": 1}))[0] == 200
        for ws in [warm, *sockets]:
            (msg,) = await messages(ws, 1)
            assert msg["data"] == {"n": 1}
        for ws in [warm, *sockets]:
            await ws.close()


# -- a failure after the upgrade ----------------------------------------------------------------
@pytest.mark.parametrize("redis_url", ["single"], indirect=True)
@pytest.mark.parametrize("overrides", [{"http": {"max_websockets_per_principal": 1}}])
@pytest.mark.parametrize(
    ("failure", "code", "reason"),
    [
        (RuntimeError("injected: a bug"), 1011, "internal error"),
        (RedisUnavailable("injected: Redis away"), 1013, "service unavailable, try again"),
        (
            ExceptionGroup("helpers", [MailboxFull("injected", 1)]),
            1013,
            "service unavailable, try again",
        ),
    ],
)
async def test_a_session_that_fails_after_the_upgrade_closes_with_a_code_and_gives_its_place_back(
    api: Api, monkeypatch: pytest.MonkeyPatch, failure: Exception, code: int, reason: str
) -> None:
    """Once upgraded, the socket speaks WebSocket only: a failure while it is
    served (injected here) is a close frame, never an HTTP problem document
    written onto the socket: 1011 for a fault of the daemon's, 1013 (try
    again) for a dependency away; and its place is free again."""
    from jarvisd.http import pubsub as routes

    _a, agent = await api.user("fail-agent", "agent")

    async def broken(self: Any, since: int) -> None:
        raise failure

    async with aiohttp.ClientSession() as session:
        with monkeypatch.context() as patched:
            patched.setattr(routes.Session, "run", broken)
            ws = await connect(api, agent, session)
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type is aiohttp.WSMsgType.CLOSE, msg
            assert ws.close_code == code
            assert msg.extra == reason
        # The one place this agent has was given back: a new socket works.
        again = await connect(api, agent, session)
        assert (await subscribe(again, ("user_activity",)))["type"] == "subscribed"
        assert (await publish(api, agent, "user_activity", {"n": 2}))[0] == 200
        (got,) = await messages(again, 1)
        assert got["data"] == {"n": 2}
        await again.close()
