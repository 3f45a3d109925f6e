"""``POST /publish`` and ``GET /ws`` (DESIGN §8): Redis pub/sub over HTTP.

Publishing (admins and agents): the pass-through channels ``pubsub.channels``
allows (``user_activity``), never the daemon's own (``{prefix}…``): an event
read from them is the daemon's, and an envelope on an inbox is its agent's.

Subscribing, over a WebSocket:

| channels | admin | agent | approver | user |
|---|---|---|---|---|
| ``{prefix}events``, ``{prefix}commands``, ``{prefix}approvals`` | all events | all events | all events | events about their own commands and requests |
| ``pubsub.channels`` | yes | yes | - | - |
| other ``{prefix}…`` channels (the inboxes) | yes | - | - | - |
| patterns starting with ``{prefix}``, or listed in ``pubsub.channels`` | yes | yes | - | - |
| ``{prefix}internal:*``, any other channel | - | - | - | - |

A message matching a pattern on an internal channel is never delivered.
The ops are JSON text frames (README, "WebSocket"). Each client has a bounded
socket buffer (``pubsub.client_buffer_bytes``): one that falls behind is closed with 1013,
never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import struct
from typing import Annotated, Any, Literal

import msgspec
import structlog
from aiohttp import WSMsgType, web

from actors.data.model import Principal
from actors.pubsub import Delivery, Detach, Publish, Subscribe, Subscriber, Unsubscribe
from jarvisd.http.auth import Unauthorized, authenticate, forbidden, require
from jarvisd.http.common import RouteDoc, ask, body, reply
from jarvisd.http.errors import ProblemError, reject_unknown_params
from jarvisd.http.keys import HTTP_METRICS, RUNTIME
from jarvisd.runtime import Runtime

__all__ = ["ROUTES", "websocket"]

log = structlog.get_logger("jarvisd", actor="http")
CHANNEL_RE = r"^[A-Za-z0-9_.:@/-]{1,200}$"
PATTERN_RE = r"^[A-Za-z0-9_.:@/*?\[\]^-]{1,200}$"
Channel = Annotated[str, msgspec.Meta(pattern=CHANNEL_RE)]
Pattern = Annotated[str, msgspec.Meta(pattern=PATTERN_RE)]
MAX_SUBSCRIPTIONS = 100
AUTH_WAIT = 10.0
# 1008: policy violation (no or bad credentials); 1013: try again later (too slow).
WS_POLICY, WS_TRY_LATER, WS_GOING_AWAY = 1008, 1013, 1001


class PublishBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    channel: Channel
    message: Any  # any JSON value; published as its JSON text


class Published(msgspec.Struct, frozen=True):
    channel: str
    receivers: int


# -- channel rules ------------------------------------------------------------------------
class Rules:
    """What a caller may publish and see, from the daemon's settings: the
    daemon's event channels, and the pass-through channels ``pubsub.channels``
    allows. Nothing else of the Redis server is reachable through jarvisd:
    not the inboxes (agents write their own, on Redis), not the internal
    channels, not another instance's channels."""

    def __init__(self, rt: Runtime) -> None:
        prefix = rt.settings.redis.prefix
        self.prefix = prefix
        self.internal = f"{prefix}internal:"
        self.event_channels = frozenset(f"{prefix}{k}" for k in ("events", "commands", "approvals"))
        self.allowlist = tuple(rt.settings.pubsub.channels)
        # A pattern that starts with the prefix matches only the daemon's
        # channels, unless the prefix itself holds glob characters.
        self.literal_prefix = not any(ch in prefix for ch in "*?[]\\")

    def allowed(self, channel: str) -> bool:
        return not channel.startswith(self.prefix) and any(
            fnmatch.fnmatchcase(channel, glob) for glob in self.allowlist
        )

    def may_publish(self, who: Principal, channel: str) -> bool:
        return who.role in ("admin", "agent") and self.allowed(channel)

    def may_subscribe(self, who: Principal, channel: str) -> bool:
        if channel.startswith(self.internal):
            return False
        if channel in self.event_channels:
            return True
        if who.role not in ("admin", "agent"):
            return False
        if channel.startswith(self.prefix):
            return who.role == "admin"  # the inboxes, as they pass
        return self.allowed(channel)

    def may_pattern(self, who: Principal, pattern: str) -> bool:
        if who.role not in ("admin", "agent"):
            return False
        return (self.literal_prefix and pattern.startswith(self.prefix)) or (
            pattern in self.allowlist
        )

    def may_see(self, who: Principal, item: Delivery) -> bool:
        channel = item.channel
        if channel.startswith(self.internal):
            return False
        if who.role == "user":
            # A user sees the daemon's events about themselves, nothing else.
            return channel in self.event_channels and _user_of(item.data) == who.user_id
        if channel in self.event_channels:
            return True
        if who.role not in ("admin", "agent"):
            return False
        if channel.startswith(self.prefix):
            return who.role == "admin"
        return self.allowed(channel)


class _UserOf(msgspec.Struct, rename="camel"):
    user_id: int | None = None


_user_decoder = msgspec.json.Decoder(_UserOf)


def _user_of(data: bytes) -> int | None:
    try:
        return _user_decoder.decode(data).user_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


# -- POST /publish ----------------------------------------------------------------------------
@require()
async def publish(request: web.Request, who: Principal) -> web.Response:
    reject_unknown_params(request, ())
    rt = request.app[RUNTIME]
    b = await body(request, PublishBody)
    if not Rules(rt).may_publish(who, b.channel):
        raise forbidden(
            f"admins and agents publish on the channels pubsub.channels allows "
            f"({', '.join(rt.settings.pubsub.channels) or 'none'}); commands go to "
            "POST /commands, and an agent's envelopes to its own inbox on Redis"
            if who.role in ("admin", "agent")
            else f"the {who.role} role may not publish"
        )
    data = msgspec.json.encode(b.message)
    limit = rt.settings.pubsub.max_message_bytes
    if len(data) > limit:
        raise ProblemError(
            413, "Payload too large", f"message of {len(data)} bytes is over {limit} bytes"
        )
    receivers = await ask(request, "pubsub", Publish(b.channel, data))
    return reply(Published(b.channel, receivers))


# -- GET /ws --------------------------------------------------------------------------------------
class _Op(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    op: Literal["subscribe", "unsubscribe", "ping", "auth"]
    channels: Annotated[list[Channel], msgspec.Meta(max_length=MAX_SUBSCRIPTIONS)] = []
    patterns: Annotated[list[Pattern], msgspec.Meta(max_length=MAX_SUBSCRIPTIONS)] = []
    token: Annotated[str, msgspec.Meta(max_length=512)] | None = None


_op_decoder = msgspec.json.Decoder(_Op)
_encoder = msgspec.json.Encoder()


def _payload(item: Delivery) -> bytes:
    if item.kind == "gap":
        return _encoder.encode(
            {"type": "subscription.gap", "reason": item.data.decode(errors="replace")}
        )
    try:
        data: Any = msgspec.Raw(item.data) if _is_json(item.data) else item.data.decode()
    except UnicodeError:
        data = item.data.decode(errors="replace")
    return _encoder.encode(
        {"type": "message", "channel": item.channel, "pattern": item.pattern, "data": data}
    )


_last_frame: tuple[Delivery | None, bytes] = (None, b"")


def _frame(item: Delivery) -> bytes:
    """The whole WebSocket text frame of a delivery (RFC 6455 §5.2: a server's
    frames are unmasked, so every client gets the same bytes). The pub/sub
    actor hands one delivery to all its subscribers in a row: the frame is
    built for the first and reused for the others."""
    global _last_frame
    if _last_frame[0] is item:
        return _last_frame[1]
    payload = _payload(item)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    frame = header + payload
    _last_frame = (item, frame)
    return frame


def _is_json(data: bytes) -> bool:
    try:
        msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


async def websocket(request: web.Request) -> web.StreamResponse:
    reject_unknown_params(request, ())
    rt = request.app[RUNTIME]
    # Uncompressed: a message is encoded once and the same frame goes to every client.
    ws = web.WebSocketResponse(
        heartbeat=rt.settings.pubsub.ws_heartbeat, max_msg_size=65_536, compress=False
    )
    if not ws.can_prepare(request).ok:
        raise ProblemError(400, "Bad request", "GET /ws expects a WebSocket upgrade")
    metrics = request.app[HTTP_METRICS]
    limit = rt.settings.http.max_websockets
    if metrics.websockets >= limit:
        metrics.refused += 1
        raise ProblemError(
            503,
            "Overloaded",
            f"{limit} WebSocket clients are connected (http.max_websockets)",
            headers={"Retry-After": "5"},
        )
    metrics.websockets += 1
    try:
        who = await authenticate(request)  # 401 for bad credentials; none: an auth op first
        if who is None:
            # Those still to send their credentials hold a place without
            # having shown any: at most a tenth of the places.
            waiting = max(1, limit // 10)
            if metrics.websockets_unauthenticated >= waiting:
                metrics.refused += 1
                raise ProblemError(
                    503,
                    "Overloaded",
                    f"{waiting} WebSocket clients are waiting to authenticate "
                    "(a tenth of http.max_websockets); send credentials with the upgrade "
                    "or try again shortly",
                    headers={"Retry-After": "5"},
                )
            metrics.websockets_unauthenticated += 1
            try:
                await ws.prepare(request)
                who = await _first_auth(request, ws)
            finally:
                metrics.websockets_unauthenticated -= 1
            if who is None:
                return ws
        else:
            await ws.prepare(request)
        session = _Session(rt, request, ws, who)
        await session.run()
        return ws
    finally:
        metrics.websockets -= 1


async def _first_auth(request: web.Request, ws: web.WebSocketResponse) -> Principal | None:
    """Browsers cannot send headers with a WebSocket: the first frame may be
    {"op": "auth", "token": …}."""
    try:
        async with asyncio.timeout(AUTH_WAIT):
            msg = await ws.receive()
        op = _op_decoder.decode(msg.data) if msg.type == WSMsgType.TEXT else None
        if op is None or op.op != "auth" or not op.token:
            raise Unauthorized('send {"op": "auth", "token": …} first')
        # authenticate() reads the header: present the token the same way.
        headers = request.headers.copy()
        headers["Authorization"] = f"Bearer {op.token}"
        who = await authenticate(request.clone(headers=headers))
        if who is None:
            raise Unauthorized("no credentials")
    except (TimeoutError, msgspec.DecodeError, msgspec.ValidationError, Unauthorized) as exc:
        reason = exc.detail if isinstance(exc, Unauthorized) else "authenticate first"
        await ws.close(code=WS_POLICY, message=reason.encode()[:120])
        return None
    try:
        await ws.send_str(_encoder.encode({"type": "authenticated", "user": who.name}).decode())
    except ConnectionResetError:
        return None  # gone right after authenticating
    return who


class _Session:
    """One WebSocket client. Ops are read in the request's task; deliveries
    are written by the pub/sub actor, straight to the socket, as they arrive
    (no task, no copy per client): a client whose socket buffer passes
    ``pubsub.client_buffer_bytes`` is closed with 1013."""

    def __init__(
        self, rt: Runtime, request: web.Request, ws: web.WebSocketResponse, who: Principal
    ) -> None:
        self.rt = rt
        self.request = request
        self.ws = ws
        self.who = who
        self.rules = Rules(rt)
        self.pubsub = rt.actor("pubsub")
        self.limit = rt.settings.pubsub.client_buffer_bytes
        self.closing: asyncio.Task[None] | None = None
        self.sub = Subscriber(f"ws:{who.name}", sink=self._deliver, on_close=self._closed)
        # Frames delivered in one turn of the event loop go out in one write.
        self.out: list[bytes] = []
        self.out_bytes = 0

    def _deliver(self, item: Delivery) -> bool:
        if item.kind == "down" or (
            item.kind == "message" and not self.rules.may_see(self.who, item)
        ):
            return True  # a gap notice follows a "down" once Redis is back
        transport = self.request.transport
        if transport is None or transport.is_closing():
            return True  # going away: the request's task cleans up
        frame = _frame(item)
        if transport.get_write_buffer_size() + self.out_bytes + len(frame) > self.limit:
            return False
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(frame)
        self.out_bytes += len(frame)
        return True

    def _flush(self) -> None:
        out, self.out, self.out_bytes = self.out, [], 0
        transport = self.request.transport
        if transport is not None and not transport.is_closing():
            transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _closed(self, reason: str) -> None:
        """The pub/sub actor let the subscriber go (too slow, or stopping)."""
        if self.closing is None and not self.ws.closed:
            self.closing = asyncio.get_running_loop().create_task(self._close(reason))

    async def _close(self, reason: str) -> None:
        code = WS_TRY_LATER if reason.startswith("too slow") else WS_GOING_AWAY
        # A client too slow to read may not read the close frame either: bound the wait.
        try:
            async with asyncio.timeout(2):
                await self.ws.close(code=code, message=reason.encode()[:120])
        except (TimeoutError, ConnectionError):
            log.info("ws_aborted", reason=reason)
        finally:
            transport = self.request.transport
            if transport is not None and not transport.is_closing():
                transport.abort()

    async def run(self) -> None:
        try:
            await self._read()
        except ConnectionResetError:
            # The client went away while it was being answered: its own
            # doing, not a server error.
            log.info("ws_client_gone", user=self.who.name)
        finally:
            self.sub.on_close = None  # leaving anyway
            self.sub.close("the client went away")
            with contextlib.suppress(Exception):
                await self.pubsub.ask(Detach(self.sub), timeout=5)
            if self.closing is not None:
                await asyncio.gather(self.closing, return_exceptions=True)

    async def _send(self, doc: dict[str, Any]) -> None:
        await self.ws.send_str(_encoder.encode(doc).decode())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != WSMsgType.TEXT:
                await self._send({"type": "error", "error": "send JSON text frames"})
                continue
            try:
                op = _op_decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await self._send({"type": "error", "error": f"invalid op: {exc}"})
                continue
            await self._do(op)

    async def _do(self, op: _Op) -> None:
        if op.op == "ping":
            await self._send({"type": "pong"})
            return
        if op.op == "auth":
            await self._send({"type": "error", "op": "auth", "error": "already authenticated"})
            return
        channels, patterns = tuple(dict.fromkeys(op.channels)), tuple(dict.fromkeys(op.patterns))
        if op.op == "subscribe":
            refused = [c for c in channels if not self.rules.may_subscribe(self.who, c)]
            refused += [p for p in patterns if not self.rules.may_pattern(self.who, p)]
            if refused:
                await self._send(
                    {"type": "error", "op": "subscribe", "error": "not allowed", "refused": refused}
                )
                return
            total = len(self.sub.channels | set(channels)) + len(self.sub.patterns | set(patterns))
            if total > MAX_SUBSCRIPTIONS:
                await self._send(
                    {
                        "type": "error",
                        "op": "subscribe",
                        "error": f"at most {MAX_SUBSCRIPTIONS} subscriptions",
                    }
                )
                return
            try:
                await self.pubsub.ask(Subscribe(self.sub, channels, patterns), timeout=10)
            except Exception as exc:  # Redis unreachable: say so, keep the socket
                await self._send({"type": "error", "op": "subscribe", "error": str(exc)})
                return
            await self._send({"type": "subscribed", "channels": channels, "patterns": patterns})
        else:
            await self.pubsub.ask(Unsubscribe(self.sub, channels, patterns), timeout=10)
            await self._send({"type": "unsubscribed", "channels": channels, "patterns": patterns})


ROUTES: list[RouteDoc] = [
    RouteDoc(
        "POST",
        "/publish",
        publish,
        "Publish a JSON message on a channel (admins and agents)",
        PublishBody,
        Published,
    ),
]
