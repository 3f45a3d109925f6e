"""What goes over ``GET /ws``: the ops a client sends, and the frames the
daemon sends it (each delivery encoded and framed once for all the sockets
that get it), and how a socket is closed."""

from __future__ import annotations

import asyncio
import struct
from typing import Annotated, Any, Literal

import msgspec
import structlog
from aiohttp import web

from actors.pubsub import Delivery
from jarvisd.http.channels import Channel, Pattern

__all__ = [
    "MAX_SUBSCRIPTIONS",
    "WS_GOING_AWAY",
    "WS_INTERNAL",
    "WS_POLICY",
    "WS_TRY_LATER",
    "Op",
    "close_within",
    "delivery_frame",
    "delivery_payload",
    "encoder",
    "op_decoder",
    "text_frame",
]

log = structlog.get_logger("jarvisd", actor="http")
MAX_SUBSCRIPTIONS = 100
# 1008: policy violation (no or bad credentials); 1013: try again later (too
# slow); 1011: the daemon failed (its log says how).
WS_POLICY, WS_TRY_LATER, WS_GOING_AWAY, WS_INTERNAL = 1008, 1013, 1001, 1011


class Op(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    op: Literal["subscribe", "unsubscribe", "ping", "auth"]
    channels: Annotated[list[Channel], msgspec.Meta(max_length=MAX_SUBSCRIPTIONS)] = []
    patterns: Annotated[list[Pattern], msgspec.Meta(max_length=MAX_SUBSCRIPTIONS)] = []
    token: Annotated[str, msgspec.Meta(max_length=512)] | None = None
    # subscribe: resume the event channels after this event id (ws_replay).
    since: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None


op_decoder = msgspec.json.Decoder(Op)
encoder = msgspec.json.Encoder()


def delivery_payload(item: Delivery) -> bytes:
    if item.kind == "gap":
        return encoder.encode(
            {"type": "subscription.gap", "reason": item.data.decode(errors="replace")}
        )
    try:
        data: Any = msgspec.Raw(item.data) if _is_json(item.data) else item.data.decode()
    except UnicodeError:
        data = item.data.decode(errors="replace")
    return encoder.encode(
        {"type": "message", "channel": item.channel, "pattern": item.pattern, "data": data}
    )


def text_frame(data: bytes) -> bytes:
    """``data`` as one unmasked, uncompressed text frame (RFC 6455 §5.2):
    what a server sends on a socket opened with ``compress=False``."""
    n = len(data)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + data
    if n < 65_536:
        return struct.pack("!BBH", 0x81, 126, n) + data
    return struct.pack("!BBQ", 0x81, 127, n) + data


_last: tuple[Delivery | None, bytes] = (None, b"")


def delivery_frame(item: Delivery) -> bytes:
    """A delivery as the client receives it, framed. The pub/sub actor hands
    one delivery to all its subscribers in a row: it is encoded and framed
    for the first, and the same bytes go to the others."""
    global _last
    if _last[0] is not item:
        _last = (item, text_frame(delivery_payload(item)))
    return _last[1]


def _is_json(data: bytes) -> bool:
    try:
        msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


async def close_within(
    request: web.Request, ws: web.WebSocketResponse, code: int, reason: str
) -> None:
    """Close with ``code``; a client too slow to read may not read the close
    frame either, so the wait is 2 s at most and the connection is then cut."""
    try:
        async with asyncio.timeout(2):
            await ws.close(code=code, message=reason.encode()[:120])
    except (TimeoutError, ConnectionError):
        log.info("ws_aborted", reason=reason)
    finally:
        if request.transport is not None and not request.transport.is_closing():
            request.transport.abort()
