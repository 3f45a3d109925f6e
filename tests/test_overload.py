"""Overload answers 503 with Retry-After at once instead of queueing: requests
in progress past http.max_in_flight, WebSocket clients past http.max_websockets
(a tenth of them at most still waiting to authenticate), authenticated health
requests past their own budget."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp
import asyncpg
import pytest
from multidict import CIMultiDictProxy

from config import LoadedConfig
from jarvisd.http.keys import HTTP_METRICS
from jarvisd.http.middleware import GUARDED_IN_FLIGHT
from tests.test_api import Api
from tests.test_http import Running, start_daemon


async def _stalled_body(port: int, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request whose handler is in progress: it waits for a body that never comes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /cache/set HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    await writer.drain()
    return reader, writer


async def test_requests_past_max_in_flight_get_503_with_retry_after_and_health_still_answers(
    make_config: Callable[..., LoadedConfig],
) -> None:
    loaded = make_config(http={"max_in_flight": 2})
    async for running in start_daemon(loaded):
        await running.wait_ready()
        token = await _token(running, loaded, "busy", "agent")
        port = running.daemon.http.bound_port
        assert running.daemon.http.app is not None
        metrics = running.daemon.http.app[HTTP_METRICS]
        stalled = [await _stalled_body(port, token) for _ in range(2)]
        try:
            async with asyncio.timeout(5):
                while metrics.admitted < 2:
                    await asyncio.sleep(0.01)
            async with running.session.get(running.base + "/openapi.json") as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                assert resp.content_type == "application/problem+json"
                assert "http.max_in_flight" in (await resp.json())["detail"]
            assert (await running.get("/health/ready"))[0] == 200
            assert "jarvisd_http_overload_refused_total 1" in (await running.get("/metrics"))[2]
        finally:
            for _reader, writer in stalled:
                writer.close()
        async with asyncio.timeout(5):  # the stalled ones end: room again
            while (await running.get("/openapi.json"))[0] != 200:
                await asyncio.sleep(0.05)


async def test_websocket_clients_past_max_websockets_get_503(
    make_config: Callable[..., LoadedConfig],
) -> None:
    loaded = make_config(http={"max_websockets": 2})
    async for running in start_daemon(loaded):
        await running.wait_ready()
        token = await _token(running, loaded, "ws-cap", "agent")
        url = running.base.replace("http", "ws") + "/ws"
        first = await running.session.ws_connect(url, headers=_bearer(token))
        second = await running.session.ws_connect(url, headers=_bearer(token))
        try:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await running.session.ws_connect(url, headers=_bearer(token))
            assert refused.value.status == 503
            await first.close()
            async with asyncio.timeout(5):  # one left: room for another
                while True:
                    try:
                        third = await running.session.ws_connect(url, headers=_bearer(token))
                        break
                    except aiohttp.WSServerHandshakeError:
                        await asyncio.sleep(0.05)
            await third.close()
        finally:
            await second.close()


async def test_authenticated_health_has_a_budget_of_its_own(
    make_config: Callable[..., LoadedConfig], pg_dsn: str
) -> None:
    """With public_health = false, /metrics and the like look tokens up: a
    flood of unknown ones (here held up by a lock on the tokens) is bounded by
    GUARDED_IN_FLIGHT, outside http.max_in_flight, and the rest answer 503 at
    once; a monitor whose token is known still gets in."""
    # Held lookups must outlast the test's waits: a long request_timeout.
    loaded = make_config(http={"public_health": False, "request_timeout": 60})
    admin = await asyncpg.connect(pg_dsn)
    try:
        async for running in start_daemon(loaded):
            await _guarded_budget(running, loaded, admin)
    finally:
        await admin.close()


async def _guarded_budget(
    running: Running, loaded: LoadedConfig, admin: asyncpg.Connection
) -> None:
    assert loaded.settings.http.unix_socket is not None
    api = Api(running, loaded.settings.http.unix_socket)
    try:
        async with asyncio.timeout(20):  # the local admin may ask
            while (await api.call("GET", "/health/ready", local=True))[0] != 200:
                await asyncio.sleep(0.05)
    finally:
        await api.unix.close()
    token = await _token(running, loaded, "watcher", "admin")
    assert running.daemon.http.app is not None
    metrics = running.daemon.http.app[HTTP_METRICS]
    async with asyncio.timeout(20):  # the monitor's token, known (cached) once used
        while not running.daemon.runtime.principals.enabled:
            await asyncio.sleep(0.05)
        assert (await _get(running, "/metrics", token))[0] == 200
    # Well-formed tokens that match nothing: each one a lookup in the database.
    bogus = [token[:-6] + f"{n:06d}" for n in range(GUARDED_IN_FLIGHT + 16)]
    held: list[asyncio.Task[tuple[int, CIMultiDictProxy[str], str]]] = []
    lock = admin.transaction()
    await lock.start()
    try:
        await admin.execute("LOCK TABLE api_tokens IN ACCESS EXCLUSIVE MODE")
        held += [
            asyncio.create_task(_get(running, "/metrics", t)) for t in bogus[:GUARDED_IN_FLIGHT]
        ]
        async with asyncio.timeout(20):
            while metrics.guarded < GUARDED_IN_FLIGHT:
                await asyncio.sleep(0.01)
        for t in bogus[GUARDED_IN_FLIGHT:]:
            status, headers, body = await _get(running, "/stats", t)
            assert (status, headers["Retry-After"]) == (503, "1"), body
            assert "authenticated health" in json.loads(body)["detail"]
        assert metrics.admitted == 0  # http.max_in_flight untouched
        assert (await running.get("/health/live"))[0] == 200
        # A monitor already known needs no lookup: it gets in whatever the flood.
        assert (await _get(running, "/health/ready", token))[0] == 200
    finally:
        await lock.rollback()
        answers = await asyncio.gather(*held, return_exceptions=True)
    assert {a[0] if isinstance(a, tuple) else repr(a) for a in answers} == {401}
    assert metrics.guarded == 0
    assert (await _get(running, "/metrics", token))[0] == 200


async def test_websockets_waiting_to_authenticate_hold_at_most_a_tenth_of_the_places(
    make_config: Callable[..., LoadedConfig],
) -> None:
    loaded = make_config(http={"max_websockets": 20})
    async for running in start_daemon(loaded):
        await running.wait_ready()
        token = await _token(running, loaded, "ws-ok", "agent")
        url = running.base.replace("http", "ws") + "/ws"
        silent = [await running.session.ws_connect(url) for _ in range(2)]
        open_ = list(silent)
        try:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await running.session.ws_connect(url)
            assert refused.value.status == 503
            assert refused.value.headers is not None
            assert refused.value.headers["Retry-After"] == "5"
            # Credentials with the upgrade: the other places are theirs.
            for _ in range(18):
                open_.append(await running.session.ws_connect(url, headers=_bearer(token)))
            with pytest.raises(aiohttp.WSServerHandshakeError) as full:
                await running.session.ws_connect(url, headers=_bearer(token))
            assert full.value.status == 503
            # One of the silent ones authenticates: it keeps its place, and
            # another may wait for its first frame again once one is closed.
            await silent[0].send_json({"op": "auth", "token": token})
            assert (await silent[0].receive_json(timeout=5))["type"] == "authenticated"
            await open_.pop().close()
            async with asyncio.timeout(5):
                while True:
                    try:
                        open_.append(await running.session.ws_connect(url))
                        break
                    except aiohttp.WSServerHandshakeError:
                        await asyncio.sleep(0.05)
        finally:
            for ws in open_:
                await ws.close()


async def _token(running: Running, loaded: LoadedConfig, name: str, role: str) -> str:
    """The API token of a new user, made by the local admin."""
    assert loaded.settings.http.unix_socket is not None
    api = Api(running, loaded.settings.http.unix_socket)
    try:
        return (await api.user(name, role))[1]
    finally:
        await api.unix.close()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _get(running: Running, path: str, token: str) -> tuple[int, CIMultiDictProxy[str], str]:
    async with running.session.get(running.base + path, headers=_bearer(token)) as resp:
        return resp.status, resp.headers, await resp.text()
