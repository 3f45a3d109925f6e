"""Lean measuring clients for the fan-out benchmark: a WebSocket reader and a
Redis subscriber written as bare asyncio protocols, so that the measuring side
costs a few microseconds a message and the figures are the server's.

Each message carries ``"t": <time.perf_counter() at publish>`` (one monotonic
clock for every process on the host); the readers record now minus t.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
from urllib.parse import urlsplit

__all__ = ["keepalive_load", "read_raw_redis", "read_websockets"]

_T = re.compile(rb'"t":\s*([0-9.eE+-]+)')


class _Counter:
    def __init__(self, total: int) -> None:
        self.lat: list[float] = []
        self.total = total
        self.done = asyncio.get_running_loop().create_future()

    def seen(self, payload: bytes) -> None:
        m = _T.search(payload)
        if m is None:
            return
        self.lat.append((time.perf_counter() - float(m.group(1))) * 1000)
        if len(self.lat) >= self.total and not self.done.done():
            self.done.set_result(None)


class _WsReader(asyncio.Protocol):
    """Reads unmasked server frames (RFC 6455 §5.2) after the handshake."""

    def __init__(self, counter: _Counter, ready: asyncio.Future[None]) -> None:
        self.counter = counter
        self.ready = ready
        self.buf = bytearray()
        self.handshaken = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.handshaken:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(bytes(self.buf[:200]))
            del self.buf[: end + 4]
            self.handshaken = True
        while len(self.buf) >= 2:
            length = self.buf[1] & 0x7F
            start = 2
            if length == 126:
                if len(self.buf) < 4:
                    return
                length, start = int.from_bytes(self.buf[2:4], "big"), 4
            elif length == 127:
                if len(self.buf) < 10:
                    return
                length, start = int.from_bytes(self.buf[2:10], "big"), 10
            if len(self.buf) < start + length:
                return
            opcode = self.buf[0] & 0x0F
            payload = bytes(self.buf[start : start + length])
            del self.buf[: start + length]
            if opcode == 0x1:
                if b'"subscribed"' in payload and not self.ready.done():
                    self.ready.set_result(None)
                else:
                    self.counter.seen(payload)
            elif opcode == 0x9 and self.transport is not None:  # ping: answer pong
                self.transport.write(_frame(0xA, payload))


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (payloads under 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def read_websockets(
    base: str, token: str, channel: str, clients: int, count: int
) -> list[float]:
    loop = asyncio.get_running_loop()
    counters: list[_Counter] = []
    url = urlsplit(base)
    for _ in range(clients):
        counter = _Counter(count)
        ready: asyncio.Future[None] = loop.create_future()
        transport, _p = await loop.create_connection(
            lambda c=counter, r=ready: _WsReader(c, r), url.hostname, url.port
        )
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: {url.hostname}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        op = json.dumps({"op": "subscribe", "channels": [channel]}).encode()
        transport.write(_frame(0x1, op))
        await asyncio.wait_for(ready, 10)
        counters.append(counter)
    print("ready", flush=True)
    await asyncio.wait_for(asyncio.gather(*(c.done for c in counters)), 120)
    return [x for c in counters for x in c.lat]


class _RespReader(asyncio.Protocol):
    """Reads RESP2 pub/sub pushes: *3 $7 message $<channel> $<data>."""

    def __init__(self, counter: _Counter, ready: asyncio.Future[None]) -> None:
        self.counter = counter
        self.ready = ready
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            parts, used = _resp_array(self.buf)
            if parts is None:
                return
            del self.buf[:used]
            if parts[0] == b"subscribe" and not self.ready.done():
                self.ready.set_result(None)
            elif parts[0] == b"message":
                self.counter.seen(parts[2])


def _resp_array(buf: bytearray) -> tuple[list[bytes] | None, int]:
    if not buf.startswith(b"*"):
        return None, 0
    end = buf.find(b"\r\n")
    if end < 0:
        return None, 0
    n, pos, parts = int(buf[1:end]), end + 2, []
    for _ in range(n):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None, 0
        if buf[pos : pos + 1] == b":":
            parts.append(bytes(buf[pos + 1 : end]))
            pos = end + 2
            continue
        size = int(buf[pos + 1 : end])
        start = end + 2
        if len(buf) < start + size + 2:
            return None, 0
        parts.append(bytes(buf[start : start + size]))
        pos = start + size + 2
    return parts, pos


async def read_raw_redis(url: str, channel: str, clients: int, count: int) -> list[float]:
    loop = asyncio.get_running_loop()
    counters: list[_Counter] = []
    target = urlsplit(url)
    for _ in range(clients):
        counter = _Counter(count)
        ready: asyncio.Future[None] = loop.create_future()
        if target.scheme == "unix":
            transport, _p = await loop.create_unix_connection(
                lambda c=counter, r=ready: _RespReader(c, r), target.path
            )
        else:
            transport, _p = await loop.create_connection(
                lambda c=counter, r=ready: _RespReader(c, r),
                target.hostname,
                target.port or 6379,
            )
        name = channel.encode()
        transport.write(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(name), name))
        await asyncio.wait_for(ready, 10)
        counters.append(counter)
    print("ready", flush=True)
    await asyncio.wait_for(asyncio.gather(*(c.done for c in counters)), 120)
    return [x for c in counters for x in c.lat]


class _HttpClient(asyncio.Protocol):
    """One keep-alive connection sending a GET every ``interval`` seconds (a
    user), timing each answer from send to its last byte."""

    def __init__(self, request: bytes, interval: float, until: float, out: list[float]) -> None:
        self.request = request
        self.interval = interval
        self.until = until
        self.out = out
        self.errors = 0
        self.buf = bytearray()
        self.sent = 0.0
        self.transport: asyncio.Transport | None = None
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Users do not arrive in step: the first request at a random offset.
        asyncio.get_running_loop().call_later(self.interval * (os.urandom(1)[0] / 255), self._send)

    def _send(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if time.perf_counter() >= self.until:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.sent = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end])
        m = re.search(rb"content-length:\s*(\d+)", head, re.I)
        size = int(m.group(1)) if m else 0
        if len(self.buf) < end + 4 + size:
            return
        del self.buf[: end + 4 + size]
        if not head.startswith(b"HTTP/1.1 200"):
            self.errors += 1
        self.out.append((time.perf_counter() - self.sent) * 1000)
        delay = max(0.0, self.sent + self.interval - time.perf_counter())
        asyncio.get_running_loop().call_later(delay, self._send)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.errors += 1
            self.done.set_result(None)


async def keepalive_load(
    base: str, path: str, token: str, connections: int, per_second: float, seconds: float
) -> tuple[list[float], int]:
    """``connections`` keep-alive users, each asking ``path`` ``per_second``
    times a second for ``seconds``: the latencies (ms) and the errors."""
    url = urlsplit(base)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {url.hostname}\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    clients = []
    until = time.perf_counter() + seconds
    for _ in range(connections):
        _t, client = await loop.create_connection(
            lambda: _HttpClient(request, 1 / per_second, until, lat), url.hostname, url.port
        )
        clients.append(client)
    await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)), seconds + 60)
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    return lat, sum(c.errors for c in clients)
