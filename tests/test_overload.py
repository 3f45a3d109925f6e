"""Overload answers 503 with Retry-After at once instead of queueing: requests
in progress past http.max_in_flight, WebSocket clients past http.max_websockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest

from config import LoadedConfig
from jarvisd.http.keys import HTTP_METRICS
from tests.test_api import Api
from tests.test_http import start_daemon


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
        assert loaded.settings.http.unix_socket is not None
        api = Api(running, loaded.settings.http.unix_socket)
        _uid, token = await api.user("busy", "agent")
        await api.unix.close()
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
    async for running in start_daemon(make_config(http={"max_websockets": 2})):
        await running.wait_ready()
        url = running.base.replace("http", "ws") + "/ws"
        first = await running.session.ws_connect(url)
        second = await running.session.ws_connect(url)
        try:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await running.session.ws_connect(url)
            assert refused.value.status == 503
            await first.close()
            async with asyncio.timeout(5):  # one left: room for another
                while True:
                    try:
                        third = await running.session.ws_connect(url)
                        break
                    except aiohttp.WSServerHandshakeError:
                        await asyncio.sleep(0.05)
            await third.close()
        finally:
            await second.close()
