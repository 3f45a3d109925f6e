"""Hypothesis-driven fuzzing of what agents send: envelopes (to the parser,
then through the inbox of a running daemon) and WebSocket ops. Nothing may
crash, nothing may answer 500, and every envelope that is not committed is
dead-lettered with its entry id: none is dropped without a trace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.envelope import CommandRequested, Envelope, Malformed, parse
from actors.redis_link import RedisClient, connect_redis
from config import LoadedConfig
from tests.servers import LoopThread, stream_drained
from tests.test_api import Api
from tests.test_faults import server_errors
from tests.test_http import Running, start_daemon

# Once per CI run (the embedded pass): the inputs, not the servers, are what vary.
pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same inputs on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
KINDS = ["command.requested", "command.started", "command.completed", "command.failed",
         "cache.invalidate", "approval.decided", "", "command"]  # fmt: skip


@st.composite
def envelopes(draw: st.DrawFn) -> bytes:
    """Bytes that are mostly almost-envelopes: a valid request with fields
    dropped, retyped or replaced; sometimes garbage."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.binary(max_size=300))
    if choice == 1:
        return json.dumps(draw(json_values)).encode()
    doc: dict[str, Any] = {
        "v": 1,
        "id": f"fz-{uuid.uuid4().hex}",
        "type": draw(st.sampled_from(KINDS)),
        "source": "fuzz",
        "data": {
            "action": draw(st.text(max_size=40)),
            "parameters": draw(json_values),
            "riskScore": draw(st.integers(-5, 105) | st.none()),
            "requestId": f"fz-{uuid.uuid4().hex}",
        },
    }
    for key in draw(st.lists(st.sampled_from(["v", "id", "type", "data", "source"]), max_size=2)):
        if draw(st.booleans()):
            doc.pop(key, None)
        else:
            doc[key] = draw(json_values)
    for key in draw(st.lists(st.sampled_from(["action", "riskScore", "userId"]), max_size=2)):
        if isinstance(doc.get("data"), dict):
            doc["data"][key] = draw(json_values)
    return json.dumps(doc).encode()


@given(raw=envelopes() | st.binary(max_size=2000) | st.text(max_size=500))
@settings(max_examples=1000, deadline=None, derandomize=True)
def test_the_parser_answers_an_envelope_or_a_reason_for_any_input(raw: bytes | str) -> None:
    parsed = parse(raw, 65_536)
    assert isinstance(parsed, Envelope | Malformed)
    if isinstance(parsed, Malformed):
        assert parsed.reason


@pytest.fixture
def running(make_config: Callable[..., LoadedConfig]) -> Iterator[tuple[LoopThread, Running]]:
    """A daemon on an event loop of its own (a thread): hypothesis drives
    plain functions, which hand their work to that loop."""
    # A status report naming no command is retried (it may come before its
    # command): quick claims and two deliveries keep each batch short.
    bus = {
        "block_ms": 50,
        "claim_idle": 0.2,
        "claim_interval": 0.1,
        "max_deliveries": 2,
        "shared_inbox": True,
    }
    loaded = make_config(bus=bus)
    loop = LoopThread()
    runner = start_daemon(loaded)
    try:
        r = loop.run(runner.__anext__())
        loop.run(r.wait_ready())
        yield loop, r
        with contextlib.suppress(StopAsyncIteration):
            loop.run(runner.__anext__())
    finally:
        loop.close()


@pytest.mark.timeout(240)
def test_fuzzed_envelopes_are_each_committed_or_dead_lettered_never_lost(
    running: tuple[LoopThread, Running], redis_url: str, pg_dsn: str
) -> None:
    loop, daemon = running
    stream = daemon.daemon.settings.inbox
    raw = loop.run(_connect_redis(redis_url))
    db = loop.run(asyncpg.connect(pg_dsn))
    batches = 0

    async def one_batch(batch: list[bytes]) -> None:
        ids = [
            (await raw.xadd(stream, {"envelope": item})).decode()  # type: ignore[union-attr]
            for item in batch
        ]
        async with asyncio.timeout(30):
            while not await stream_drained(raw, stream):
                await asyncio.sleep(0.02)
        dead = {
            f[b"entry"].decode() for _i, f in await raw.xrange(f"{stream}:dead") if b"entry" in f
        }
        for entry_id, item in zip(ids, batch, strict=True):
            parsed = parse(item, 65_536)
            committed = isinstance(parsed, CommandRequested) and bool(
                await db.fetchval(
                    "SELECT count(*) FROM commands WHERE request_id = $1", parsed.request_id
                )
            )
            # A status report or an invalidation is applied, or dead-lettered
            # when it names nothing that exists: both leave the inbox.
            handled = isinstance(parsed, Envelope) and not isinstance(parsed, CommandRequested)
            assert committed or handled or entry_id in dead, (entry_id, item)
            assert not (committed and entry_id in dead), (entry_id, item)

    @FUZZ
    @given(batch=st.lists(envelopes(), min_size=1, max_size=12))
    def each(batch: list[bytes]) -> None:
        nonlocal batches
        batches += 1
        loop.run(one_batch(batch))

    try:
        each()
    finally:
        loop.run(db.close())
        loop.run(raw.aclose())
    assert batches >= 25
    assert server_errors(daemon) == 0


def test_fuzzed_websocket_frames_get_an_answer_each_and_never_break_the_daemon(
    running: tuple[LoopThread, Running],
) -> None:
    loop, daemon = running
    path = daemon.daemon.settings.http.unix_socket
    assert path is not None
    token = loop.run(_agent_token(daemon, path))
    url = daemon.base.replace("http", "ws") + "/ws"
    ops = st.fixed_dictionaries(
        {"op": st.sampled_from(["subscribe", "unsubscribe", "ping", "auth", "publish", "x"])},
        optional={
            "channels": st.lists(st.text(max_size=40) | st.integers(), max_size=4),
            "patterns": st.lists(st.text(max_size=40), max_size=4),
            "token": st.text(max_size=30) | st.none(),
            "extra": json_values,
        },
    )
    frames = st.one_of(
        ops.map(lambda d: ("text", json.dumps(d))),
        json_values.map(lambda v: ("text", json.dumps(v))),
        st.text(max_size=300).map(lambda t: ("text", t)),
        st.binary(max_size=300).map(lambda b: ("binary", b)),
    )

    async def one_client(sequence: list[tuple[str, Any]]) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        async with daemon.session.ws_connect(url, headers=headers) as ws:
            for kind, payload in sequence:
                if kind == "text":
                    await ws.send_str(payload)
                else:
                    await ws.send_bytes(payload)
                while True:  # deliveries may come first; then the op's own answer
                    msg = await asyncio.wait_for(ws.receive(), 10)
                    assert msg.type == aiohttp.WSMsgType.TEXT, (payload, msg)
                    answer = json.loads(msg.data)
                    if answer.get("type") not in ("message", "gap"):
                        break
                assert answer["type"] in ("error", "pong", "subscribed", "unsubscribed"), answer

    @FUZZ
    @given(sequence=st.lists(frames, min_size=1, max_size=10))
    def each(sequence: list[tuple[str, Any]]) -> None:
        frames_sent.append(len(sequence))
        loop.run(one_client(sequence))

    frames_sent: list[int] = []
    each()
    assert len(frames_sent) >= 25
    assert server_errors(daemon) == 0
    assert loop.run(daemon.get("/health/ready"))[0] == 200


async def _connect_redis(url: str) -> RedisClient:
    return connect_redis(url, name="jarvisd-fuzz")


async def _agent_token(daemon: Running, socket_path: str) -> str:
    api = Api(daemon, socket_path)
    try:
        return (await api.user("ws-fuzz", "agent"))[1]
    finally:
        await api.unix.close()
