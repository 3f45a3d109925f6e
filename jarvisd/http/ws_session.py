"""One WebSocket client of ``GET /ws`` (DESIGN §8): its ops, its deliveries,
and the credential it follows (``followers``).

Ops are JSON text frames (README, "WebSocket"). Deliveries are written by the
pub/sub actor straight to the socket as they arrive (no task, no copy per
client): a client whose socket buffer passes ``pubsub.client_buffer_bytes``
is closed with 1013, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from typing import Annotated, Any, Literal

import msgspec
import structlog
from aiohttp import WSMsgType, web

from actors.data.model import Principal
from actors.pubsub import CLIENTS_PUBSUB, Delivery, Detach, Subscribe, Subscriber, Unsubscribe
from jarvisd.http.auth import Unauthorized, principal_of
from jarvisd.http.channels import Channel, Pattern, Rules
from jarvisd.http.keys import FOLLOWERS, SHARES
from jarvisd.http.shares import principal_key
from jarvisd.principals import bearer_key
from jarvisd.runtime import Runtime

__all__ = ["MAX_SUBSCRIPTIONS", "WS_POLICY", "Op", "Session", "encoder", "op_decoder"]

log = structlog.get_logger("jarvisd", actor="http")
MAX_SUBSCRIPTIONS = 100
# 1008: policy violation (no or bad credentials); 1013: try again later (too slow).
WS_POLICY, WS_TRY_LATER, WS_GOING_AWAY = 1008, 1013, 1001


class Op(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    op: Literal["subscribe", "unsubscribe", "ping", "auth"]
    channels: Annotated[list[Channel], msgspec.Meta(max_length=MAX_SUBSCRIPTIONS)] = []
    patterns: Annotated[list[Pattern], msgspec.Meta(max_length=MAX_SUBSCRIPTIONS)] = []
    token: Annotated[str, msgspec.Meta(max_length=512)] | None = None


op_decoder = msgspec.json.Decoder(Op)
encoder = msgspec.json.Encoder()


def _payload(item: Delivery) -> bytes:
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


class Session:
    """One WebSocket client. Ops are read in the request's task; deliveries
    are written by the pub/sub actor, straight to the socket, as they arrive
    (no task, no copy per client): a client whose socket buffer passes
    ``pubsub.client_buffer_bytes`` is closed with 1013."""

    def __init__(
        self,
        rt: Runtime,
        request: web.Request,
        ws: web.WebSocketResponse,
        who: Principal,
        token: str | None,
    ) -> None:
        self.rt = rt
        self.request = request
        self.ws = ws
        self.who = who
        # The credential this socket follows (None: the local admin on the
        # Unix socket, by peer credentials, which nothing revokes).
        self.token = token
        self.key = bearer_key(token) if token is not None else None
        self.user_id = who.user_id
        self._recheck: asyncio.Task[None] | None = None
        self._again = False
        self.rules = Rules(rt)
        self.pubsub = rt.actor(CLIENTS_PUBSUB)
        self.limit = rt.settings.pubsub.client_buffer_bytes
        self.closing: asyncio.Task[None] | None = None
        self.sub = Subscriber(f"ws:{who.name}", sink=self._deliver, on_close=self._closed)
        # Frames delivered in one turn of the event loop go out in one write.
        self.out: list[bytes] = []
        self.out_bytes = 0
        # What this socket counts against its user's share of subscriptions.
        self.shares = request.app[SHARES]
        self.share_key = principal_key(who)
        self.held_channels: set[str] = set()
        self.held_patterns: set[str] = set()

    def _take(
        self, channels: tuple[str, ...], patterns: tuple[str, ...]
    ) -> tuple[tuple[str, ...], tuple[str, ...]] | str:
        """Count what is new in ``channels`` and ``patterns`` against the
        shares; returns exactly what was counted, or why nothing was."""
        new_c = tuple(c for c in channels if c not in self.held_channels)
        new_p = tuple(p for p in patterns if p not in self.held_patterns)
        why = self.shares.take_subscriptions(
            self.share_key, list(new_c), list(new_p), self.rt.settings.pubsub
        )
        if why is not None:
            return why
        self.held_channels.update(new_c)
        self.held_patterns.update(new_p)
        return new_c, new_p

    def _give_back(self, channels: tuple[str, ...], patterns: tuple[str, ...]) -> None:
        gone_c = [c for c in channels if c in self.held_channels]
        gone_p = [p for p in patterns if p in self.held_patterns]
        self.held_channels.difference_update(gone_c)
        self.held_patterns.difference_update(gone_p)
        self.shares.give_back_subscriptions(self.share_key, gone_c, gone_p)

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
        code = WS_TRY_LATER if reason.startswith("too slow") else WS_GOING_AWAY
        self._end(code, reason)

    def _end(self, code: int, reason: str) -> None:
        if self.closing is None and not self.ws.closed:
            self.closing = asyncio.get_running_loop().create_task(self._close(reason, code))

    # -- following the credential --------------------------------------------------------
    def recheck_soon(self) -> None:
        """An invalidation named this socket's user or credential: check it
        again now (once more after, if another arrives meanwhile)."""
        if self.token is None or self.ws.closed:
            return
        if self._recheck is not None and not self._recheck.done():
            self._again = True
            return
        self._recheck = asyncio.get_running_loop().create_task(self._rechecking())

    async def _rechecking(self) -> None:
        assert self.token is not None
        while True:
            self._again = False
            try:
                who = await principal_of(self.rt, self.token)
            except Unauthorized as exc:
                self._end(WS_POLICY, f"credentials no longer valid: {exc.detail}")
                return
            except Exception as exc:  # the database did not answer: try again shortly
                log.info("ws_recheck_failed", error=repr(exc))
                await asyncio.sleep(1)
                self._again = True
            else:
                if who.user_id != self.who.user_id:
                    self._end(WS_POLICY, "credentials no longer valid")
                    return
                if who.role != self.who.role:
                    await self._new_role(who)
            if not self._again:
                return

    async def _watch_time(self) -> None:
        """A credential also ends by time — a token's expiry, a login
        session's deadline or idle timeout: checked at its deadline, and
        every auth.cache_ttl seconds (which also keeps a used session alive)."""
        while True:
            wait = self.rt.settings.auth.cache_ttl
            if self.who.expires_at is not None:
                wait = min(wait, max(self.who.expires_at - time.time(), 0.0) + 0.05)
            await asyncio.sleep(wait)
            self.recheck_soon()

    async def _new_role(self, who: Principal) -> None:
        """The user's role changed: what it may no longer see goes."""
        self.who = who
        channels = tuple(c for c in self.sub.channels if not self.rules.may_subscribe(who, c))
        patterns = tuple(p for p in self.sub.patterns if not self.rules.may_pattern(who, p))
        if channels or patterns:
            await self.pubsub.ask(Unsubscribe(self.sub, channels, patterns), timeout=10)
            self._give_back(channels, patterns)
            await self._send(
                {
                    "type": "unsubscribed",
                    "channels": channels,
                    "patterns": patterns,
                    "reason": f"your role is now {who.role}",
                }
            )

    async def _close(self, reason: str, code: int) -> None:
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

    async def run(self, since: int) -> None:
        """Serve the socket; ``since``: the caller cache's generation when
        the credential was checked (anything invalidated after, checked again)."""
        followers = self.request.app[FOLLOWERS]
        followers.add(self)
        if self.rt.principals.generation != since:
            self.recheck_soon()
        timer = None
        if self.token is not None:
            timer = asyncio.get_running_loop().create_task(self._watch_time())
        try:
            await self._read()
        except ConnectionResetError:
            # The client went away while it was being answered: its own
            # doing, not a server error.
            log.info("ws_client_gone", user=self.who.name)
        finally:
            followers.remove(self)
            if timer is not None:
                timer.cancel()
                await asyncio.gather(timer, return_exceptions=True)
            self._give_back(tuple(self.held_channels), tuple(self.held_patterns))
            if self._recheck is not None:
                self._recheck.cancel()
                await asyncio.gather(self._recheck, return_exceptions=True)
            self.sub.on_close = None  # leaving anyway
            self.sub.close("the client went away")
            with contextlib.suppress(Exception):
                await self.pubsub.ask(Detach(self.sub), timeout=5)
            if self.closing is not None:
                await asyncio.gather(self.closing, return_exceptions=True)

    async def _send(self, doc: dict[str, Any]) -> None:
        await self.ws.send_str(encoder.encode(doc).decode())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != WSMsgType.TEXT:
                await self._send({"type": "error", "error": "send JSON text frames"})
                continue
            try:
                op = op_decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await self._send({"type": "error", "error": f"invalid op: {exc}"})
                continue
            await self._do(op)

    async def _do(self, op: Op) -> None:
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
            taken = self._take(channels, patterns)
            if isinstance(taken, str):
                await self._send({"type": "error", "op": "subscribe", "error": taken})
                return
            try:
                await self.pubsub.ask(Subscribe(self.sub, channels, patterns), timeout=10)
            except Exception as exc:  # Redis unreachable: say so, keep the socket
                # Only what this op took goes back, and the pub/sub actor,
                # which kept it as wanted, lets go of it too.
                self._give_back(*taken)
                with contextlib.suppress(Exception):
                    await self.pubsub.ask(Unsubscribe(self.sub, *taken), timeout=10)
                await self._send({"type": "error", "op": "subscribe", "error": str(exc)})
                return
            await self._send({"type": "subscribed", "channels": channels, "patterns": patterns})
        else:
            self._give_back(channels, patterns)
            await self.pubsub.ask(Unsubscribe(self.sub, channels, patterns), timeout=10)
            await self._send({"type": "unsubscribed", "channels": channels, "patterns": patterns})
