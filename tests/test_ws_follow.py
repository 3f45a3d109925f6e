"""An open WebSocket follows its credential: revoked, logged out or disabled
— on this daemon or another on the same servers — it is closed with 1008
within a second; demoted, it loses what its new role may not see."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from config import LoadedConfig
from tests.test_api import Api, serve_api
from tests.test_http import start_daemon
from tests.test_security import login
from tests.test_ws import CHANNELS, connect, messages, nothing_more, prefix_of, subscribe


@pytest.fixture
async def pair(
    make_config: Callable[..., LoadedConfig], tmp_path: Path
) -> AsyncIterator[tuple[Api, Api]]:
    """Two daemons on the same PostgreSQL, Redis and prefix."""
    first = make_config(pubsub={"channels": CHANNELS})
    second = make_config(
        pubsub={"channels": CHANNELS},
        daemon={"state_dir": str(tmp_path / "second")},
        http={"unix_socket": str(tmp_path / "second.sock")},
    )
    async for a in start_daemon(first):
        async for b in start_daemon(second):
            await a.wait_ready()
            await b.wait_ready()
            apis = (
                Api(a, str(first.settings.http.unix_socket)),
                Api(b, str(tmp_path / "second.sock")),
            )
            try:
                yield apis
            finally:
                for api in apis:
                    await api.unix.close()


async def closed_with(ws: aiohttp.ClientWebSocketResponse, within: float = 1.0) -> int | None:
    """The close code the daemon sends within ``within`` seconds (messages
    that were already on their way are skipped)."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                assert time.monotonic() - started <= within
                # The code in the daemon's close frame (the connection may be
                # cut just after it, which the client's own close_code reports).
                return int(msg.data) if msg.type == WSMsgType.CLOSE else ws.close_code


async def token_id(api: Api, user_id: int) -> int:
    _s, _h, tokens = await api.call("GET", f"/users/{user_id}/tokens", local=True)
    return int(tokens[0]["id"])


async def test_a_revoked_token_closes_its_socket_at_once_on_every_daemon(
    pair: tuple[Api, Api],
) -> None:
    a, b = pair
    uid, agent = await a.user("follow-agent", "agent")
    async with aiohttp.ClientSession() as s:
        on_a = await connect(a, agent, s)
        on_b = await connect(b, agent, s)
        for ws in (on_a, on_b):
            assert (await subscribe(ws, ("user_activity",)))["type"] == "subscribed"
        status, _h, _b = await a.call(
            "DELETE", f"/users/{uid}/tokens/{await token_id(a, uid)}", local=True
        )
        assert status in (200, 204)
        codes = await asyncio.gather(closed_with(on_a), closed_with(on_b))
        assert codes == [1008, 1008]
        assert (await a.call("GET", "/commands", token=agent))[0] == 401


async def test_logging_out_closes_the_sockets_opened_with_that_session(api: Any) -> None:
    await api.user("logs-out", password="logs-out password")
    session = await login(api, "logs-out", "logs-out password")
    other = await login(api, "logs-out", "logs-out password")
    async with aiohttp.ClientSession() as s:
        ws = await connect(api, session, s)
        kept = await connect(api, other, s)
        assert (await subscribe(ws, (f"{prefix_of(api)}events",)))["type"] == "subscribed"
        assert (await subscribe(kept, (f"{prefix_of(api)}events",)))["type"] == "subscribed"
        status, _h, _b = await api.call("POST", "/auth/logout", token=session)
        assert status == 204
        assert await closed_with(ws) == 1008
        await kept.send_json({"op": "ping"})  # the other session's socket stays
        assert (await asyncio.wait_for(kept.receive_json(), 2)) == {"type": "pong"}


async def test_disabling_a_user_closes_their_first_frame_sockets_too(api: Any) -> None:
    uid, token = await api.user("gets-disabled", "agent")
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(api.base + "/ws")  # a browser: credentials in the first frame
        await ws.send_json({"op": "auth", "token": token})
        assert (await ws.receive_json())["type"] == "authenticated"
        status, _h, _b = await api.call("PUT", f"/users/{uid}", local=True, json={"disabled": True})
        assert status == 200
        assert await closed_with(ws) == 1008


async def test_a_role_change_takes_away_what_the_new_role_may_not_see(api: Any) -> None:
    prefix = prefix_of(api)
    uid, token = await api.user("demoted", "agent")
    _o, other = await api.user("someone-else")
    async with aiohttp.ClientSession() as s:
        ws = await connect(api, token, s)
        reply = await subscribe(ws, ("user_activity", f"{prefix}commands"), (f"{prefix}*",))
        assert reply["type"] == "subscribed"
        status, _h, _b = await api.call("PUT", f"/users/{uid}", local=True, json={"role": "user"})
        assert status == 200
        notice = await asyncio.wait_for(ws.receive_json(), 1.0)
        assert notice["type"] == "unsubscribed"
        assert notice["channels"] == ["user_activity"]
        assert notice["patterns"] == [f"{prefix}*"]
        assert "user" in notice["reason"]
        # As a user now: others' events and the pass-through channel stay away.
        _a, admin_agent = await api.user("still-agent", "agent")
        await api.call(
            "POST", "/publish", token=admin_agent, json={"channel": "user_activity", "message": 1}
        )
        await api.call("POST", "/commands", token=other, json={"action": "theirs"})
        await nothing_more(ws, 0.7)
        _s, _h, own = await api.call("POST", "/commands", token=token, json={"action": "mine"})
        (got,) = await messages(ws, 1)
        assert got["data"]["data"]["commandId"] == own["id"]


@pytest.fixture
async def api(make_config: Callable[..., LoadedConfig]) -> AsyncIterator[Api]:
    loaded = make_config(pubsub={"channels": CHANNELS})
    async for client in serve_api(loaded):
        yield client


@pytest.fixture
async def short_sessions(make_config: Callable[..., LoadedConfig]) -> AsyncIterator[Api]:
    loaded = make_config(
        pubsub={"channels": CHANNELS},
        sessions={"absolute_ttl": 2, "idle_ttl": 2},
        auth={"cache_ttl": 0.5},
    )
    async for client in serve_api(loaded):
        yield client


async def test_a_socket_ends_with_its_session_when_the_session_runs_out(
    short_sessions: Api,
) -> None:
    api = short_sessions
    await api.user("short-lived", password="short-lived password")
    session = await login(api, "short-lived", "short-lived password")
    async with aiohttp.ClientSession() as s:
        ws = await connect(api, session, s)
        assert (await subscribe(ws, (f"{prefix_of(api)}events",)))["type"] == "subscribed"
        assert await closed_with(ws, within=4.0) == 1008
    assert (await api.call("GET", "/commands", token=session))[0] == 401
