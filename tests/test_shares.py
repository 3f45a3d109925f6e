"""No one caller takes every place: WebSockets, long-poll waiters,
subscriptions and patterns are capped per user, patterns in all, sockets
yet to authenticate per address (behind a trusted proxy: the address it
names)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from config import LoadedConfig
from jarvisd.http.keys import SHARES as SHARE_KEY
from tests.test_api import Api, serve_api
from tests.test_ws import CHANNELS, connect, prefix_of, subscribe

SHARES = {
    "http": {
        "max_websockets_per_principal": 3,
        "max_unauthenticated_per_address": 2,
        "trusted_proxies": ["127.0.0.1"],
    },
    "approvals": {"max_waiters_per_principal": 2, "default_score": 0},
    "pubsub": {
        "channels": [*CHANNELS, "c*"],
        "max_subscriptions_per_principal": 5,
        "max_patterns_per_principal": 2,
        "max_patterns": 3,
    },
}


@pytest.fixture
async def api(make_config: Callable[..., LoadedConfig]) -> AsyncIterator[Api]:
    loaded = make_config(**SHARES)
    async for client in serve_api(loaded):
        yield client


async def test_one_user_holds_at_most_their_share_of_websockets(api: Api) -> None:
    _a, hog = await api.user("socket-hog", "agent")
    _b, other = await api.user("socket-other", "agent")
    async with aiohttp.ClientSession() as s:
        mine = [await connect(api, hog, s) for _ in range(3)]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await connect(api, hog, s)
        assert refused.value.status == 429
        # A browser's first-frame login meets the same share, after its frame.
        late = await s.ws_connect(api.base + "/ws")
        await late.send_json({"op": "auth", "token": hog})
        msg = await late.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert late.close_code == 1008
        # Someone else still gets in; a place given back is free again.
        theirs = await connect(api, other, s)
        await mine[0].close()
        again = await _retry_connect(api, hog, s)
        for ws in (*mine[1:], theirs, again):
            await ws.close()


async def _retry_connect(api: Api, token: str, s: aiohttp.ClientSession) -> Any:
    async with asyncio.timeout(5):
        while True:
            try:
                return await connect(api, token, s)
            except aiohttp.WSServerHandshakeError:
                await asyncio.sleep(0.05)


async def test_silent_sockets_are_capped_per_address_and_a_trusted_proxy_names_it(
    api: Api,
) -> None:
    async with aiohttp.ClientSession() as s:
        quiet = [await s.ws_connect(api.base + "/ws") for _ in range(2)]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(api.base + "/ws")
        assert refused.value.status == 429
        # Behind the trusted proxy (127.0.0.1 here), each client is its own address.
        elsewhere = await s.ws_connect(api.base + "/ws", headers={"X-Forwarded-For": "203.0.113.9"})
        _u, token = await api.user("browser-user")
        await elsewhere.send_json({"op": "auth", "token": token})
        assert (await elsewhere.receive_json())["type"] == "authenticated"
        for ws in (*quiet, elsewhere):
            await ws.close()


async def test_subscriptions_and_patterns_are_capped_per_user_and_patterns_in_all(
    api: Api,
) -> None:
    _a, first = await api.user("subs-one", "agent")
    _b, second = await api.user("subs-two", "agent")
    async with aiohttp.ClientSession() as s:
        a1, a2 = await connect(api, first, s), await connect(api, first, s)
        assert (await subscribe(a1, ("c1", "c2", "c3")))["type"] == "subscribed"
        over = await subscribe(a2, ("c4", "c5", "c6"))  # 6 over both sockets: past 5
        assert over["type"] == "error"
        assert "max_subscriptions_per_principal" in over["error"]
        assert (await subscribe(a2, ("c4", "c5")))["type"] == "subscribed"
        p = prefix_of(api)
        assert (await subscribe(a1, (), (f"{p}1*", f"{p}2*")))["type"] == "subscribed"
        over = await subscribe(a2, (), (f"{p}3*",))
        assert "max_patterns_per_principal" in over["error"]
        b = await connect(api, second, s)
        assert (await subscribe(b, (), (f"{p}9*",)))["type"] == "subscribed"  # 3 in all
        over = await subscribe(b, (), (f"{p}8*",))
        assert "pubsub.max_patterns" in over["error"]
        assert (await subscribe(b, (), (f"{p}1*",)))["type"] == "subscribed"  # held already
        await b.send_json({"op": "unsubscribe", "patterns": [f"{p}9*"]})
        assert (await b.receive_json())["type"] == "unsubscribed"
        assert (await subscribe(b, (), (f"{p}8*",)))["type"] == "subscribed"
        for ws in (a1, a2, b):
            await ws.close()
    # Everything given back when the sockets are gone.
    app = api.r.daemon.http.app
    assert app is not None
    shares = app[SHARE_KEY]
    async with asyncio.timeout(5):
        while shares.channels or shares.patterns or shares.websockets:
            await asyncio.sleep(0.05)


async def test_past_a_users_share_of_long_polls_the_answer_comes_at_once(api: Api) -> None:
    _u, user = await api.user("poller")
    _, _, cmd = await api.call("POST", "/commands", token=user, json={"action": "delete_file"})
    url = f"{api.base}/approvals/{cmd['approvalId']}?wait=20"
    headers = {"Authorization": f"Bearer {user}"}
    async with aiohttp.ClientSession() as s:

        async def poll() -> tuple[int, str, str | None]:
            async with s.get(url, headers=headers) as resp:
                return resp.status, (await resp.json())["status"], resp.headers.get("Jarvisd-Wait")

        waiting = [asyncio.create_task(poll()) for _ in range(2)]
        async with asyncio.timeout(5):
            while api.r.daemon.supervisor.get("approvals").snapshot()["approvals"]["waiting"] < 2:
                await asyncio.sleep(0.05)
        started = asyncio.get_running_loop().time()
        assert await poll() == (200, "pending", "declined")
        assert asyncio.get_running_loop().time() - started < 2
        status, _h, _b = await api.call("PUT", f"/approvals/{cmd['approvalId']}/cancel", token=user)
        assert status == 200
        answers = await asyncio.gather(*waiting)
        assert {a[:2] for a in answers} == {(200, "cancelled")}
