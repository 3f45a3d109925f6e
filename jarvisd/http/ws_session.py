"""One WebSocket client of ``GET /ws`` (DESIGN §8): its ops, its deliveries,
and the credential it follows (``followers``).

Ops are JSON text frames (docs/agents.md, "Publishing and subscribing over HTTP").
Deliveries are written by the pub/sub actor straight to the socket, without
waiting: each message is encoded and framed once for all the clients that
get it (the socket is uncompressed), and only a replay's frames wait in the
session's queue for its writer. A client whose unsent bytes (queued and in
the socket's buffer) pass ``pubsub.client_buffer_bytes`` is closed with
1013, never waited for.

Ops are read in the request's task. The session's helpers (a replay's
writer, a check of the credential, the close) are made when there is
something for them to do, in one TaskGroup, and end with the socket; the
credential's deadline is a timer. An idle socket holds no task of its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import struct
import time
from typing import Annotated, Any, Literal

import msgspec
import structlog
from aiohttp import WSMsgType, web

from actors.data.model import Principal
from actors.pubsub import Delivery, Detach, Subscribe, Subscriber, Unsubscribe
from jarvisd.http.auth import Unauthorized, principal_of
from jarvisd.http.channels import Channel, Pattern, rules_of
from jarvisd.http.keys import FOLLOWERS, SHARES
from jarvisd.http.shares import principal_key
from jarvisd.http.ws_replay import Resume
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
    # subscribe: resume the event channels after this event id (ws_replay).
    since: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None


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


def _frame(payload: bytes) -> bytes:
    """``payload`` as one unmasked, uncompressed text frame (RFC 6455 §5.2):
    what a server sends on a socket opened with ``compress=False``."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 65_536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


_last: tuple[Delivery | None, bytes] = (None, b"")


def _framed(item: Delivery) -> bytes:
    """A delivery as the client receives it, framed. The pub/sub actor hands
    one delivery to all its subscribers in a row: it is encoded and framed
    for the first, and the same bytes go to the others."""
    global _last
    if _last[0] is not item:
        _last = (item, _frame(_payload(item)))
    return _last[1]


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

    # Slots: thousands of sessions, each without a dict of its own.
    __slots__ = (
        "_again",
        "_checking",
        "_ending",
        "_tasks",
        "_timer",
        "_writer",
        "held_channels",
        "held_patterns",
        "key",
        "limit",
        "out",
        "out_bytes",
        "pubsub",
        "request",
        "resume",
        "rt",
        "rules",
        "share_key",
        "shares",
        "sub",
        "token",
        "user_id",
        "who",
        "ws",
    )

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
        self.rules = rules_of(rt)
        self.pubsub = rt.clients
        self.limit = rt.settings.pubsub.client_buffer_bytes
        self.sub = Subscriber(f"ws:{who.name}", sink=self._deliver, on_close=self._closed)
        # An idle socket holds no task of its own and no queue: each helper
        # is made when it has something to do (thousands of sockets, each
        # costing only what it uses). The session's TaskGroup, while it runs.
        self._tasks: asyncio.TaskGroup | None = None
        # A replay's frames (and what came behind them) not written yet, their
        # size, and the task writing them: made with the first replay.
        self.out: collections.deque[bytes] | None = None
        self.out_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._checking: asyncio.Task[None] | None = None  # the credential being checked
        self._again = False  # and to be checked once more when that ends
        self._timer: asyncio.TimerHandle | None = None  # the credential's next check by time
        self._ending: tuple[int, str] | None = None  # (close code, reason) once ending
        # What this socket counts against its user's share of subscriptions.
        self.shares = request.app[SHARES]
        self.share_key = principal_key(who)
        self.held_channels: set[str] = set()
        self.held_patterns: set[str] = set()
        self.resume = Resume(rt.settings.redis.prefix)

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
        if not self.resume.admit(item):
            return True  # held while a replay runs, or had already
        return self._queue(item)

    def _queue(self, item: Delivery) -> bool:
        transport = self.request.transport
        if (
            self._ending is not None
            or self.ws.closed
            or transport is None
            or transport.is_closing()
        ):
            return True  # going away: the request's task cleans up
        frame = _framed(item)
        if transport.get_write_buffer_size() + self.out_bytes + len(frame) > self.limit:
            return False
        if self.out:  # behind a replay's frames: in order, through the writer
            self.out.append(frame)
            self.out_bytes += len(frame)
            self._write_soon()
        else:
            # Nothing waits before it: the frame goes straight to the socket
            # (frames are written whole, so aiohttp's own never interleave).
            transport.write(frame)
        return True

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None] | None:
        """A helper in the session's TaskGroup; none once the socket is done
        with (its helpers cancelled) or the group is ending. Called from other
        actors' callbacks (a delivery, an invalidation, a timer): never raises."""
        tasks = self._tasks
        if tasks is not None:
            try:
                return tasks.create_task(coro, name=name)
            except RuntimeError:  # the group is shutting down or finished
                pass
        coro.close()
        return None

    def _write_soon(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = self._spawn(self._write(), "ws.write")

    async def _write(self) -> None:
        """What waits in ``out`` (a replay's frames, and what came behind
        them), in order, each once the socket's buffer is below half the
        allowance; ends when ``out`` is empty (later frames go straight out)."""
        transport = self.request.transport
        out = self.out
        pause = 0.002
        while out:
            if (
                transport is None
                or transport.is_closing()
                or self.ws.closed
                or self._ending is not None
            ):
                # Gone, or closing: nothing is written after the close frame.
                out.clear()
                self.out_bytes = 0
                return
            if transport.get_write_buffer_size() > self.limit // 2:
                # The client reads slowly: wait, longer each time (a socket
                # that stops reading is not polled hundreds of times a second).
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
                continue
            pause = 0.002
            frame = out.popleft()
            self.out_bytes -= len(frame)
            transport.write(frame)

    def _closed(self, reason: str) -> None:
        """The pub/sub actor let the subscriber go (too slow, or stopping)."""
        code = WS_TRY_LATER if reason.startswith("too slow") else WS_GOING_AWAY
        self._end(code, reason)

    def _end(self, code: int, reason: str) -> None:
        if self._ending is None and not self.ws.closed:
            self._ending = (code, reason)
            self._spawn(self._close(code, reason), "ws.close")

    # -- following the credential --------------------------------------------------------
    def recheck_soon(self) -> None:
        """An invalidation named this socket's user or credential: check it
        again now (once more after, if another arrives meanwhile)."""
        if self.token is None or self._ending is not None:
            return
        if self._tasks is None or (self._checking is not None and not self._checking.done()):
            self._again = True  # not started yet, or checking: once more after
            return
        self._checking = self._spawn(self._recheck(), "ws.recheck")

    async def _recheck(self) -> None:
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
                continue
            if who.user_id != self.who.user_id:
                self._end(WS_POLICY, "credentials no longer valid")
                return
            if who.role != self.who.role:
                await self._new_role(who)
            if not self._again:
                return

    def _watch_time(self) -> None:
        """A credential also ends by time — a token's expiry, a login
        session's deadline or idle timeout: checked at its deadline, and
        every auth.cache_ttl seconds (which also keeps a used session alive).
        A timer, not a task, waits for that."""
        wait = self.rt.settings.auth.cache_ttl
        if self.who.expires_at is not None:
            wait = min(wait, max(self.who.expires_at - time.time(), 0.0) + 0.05)
        self._timer = asyncio.get_running_loop().call_later(wait, self._time_is_up)

    def _time_is_up(self) -> None:
        self._timer = None
        if self._tasks is not None and self._ending is None:
            self.recheck_soon()
            self._watch_time()

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

    async def _close(self, code: int, reason: str) -> None:
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
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                if self.token is not None:
                    self._watch_time()
                if self.rt.principals.generation != since or self._again:
                    self.recheck_soon()
                try:
                    # The ops, read here (not in a coroutine of their own: a
                    # frame less for each of thousands of sockets).
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
                except ConnectionResetError:
                    # The client went away while it was being answered: its own
                    # doing, not a server error.
                    log.info("ws_client_gone", user=self.who.name)
                finally:
                    # Helpers end with the socket, and none is made after;
                    # a close under way finishes.
                    self._tasks = None
                    if self._timer is not None:
                        self._timer.cancel()
                    for task in (self._writer, self._checking):
                        if task is not None:
                            task.cancel()
        finally:
            self._tasks = None
            followers.remove(self)
            self._give_back(tuple(self.held_channels), tuple(self.held_patterns))
            self.sub.on_close = None  # leaving anyway
            self.sub.close("the client went away")
            with contextlib.suppress(Exception):
                await self.pubsub.ask(Detach(self.sub), timeout=5)

    async def _replay(self, channels: tuple[str, ...], since: int) -> None:
        """What the event channels missed after ``since``, from the outbox,
        then what was held meanwhile; never more queued than half the
        socket's allowance at a time."""
        self.resume.replaying += 1
        try:
            async for page, gap in self.resume.pages(
                self.rt.persistence, self.who, channels, since
            ):
                if gap:
                    reason = f"events after {since} were pruned (events.retention)"
                    await self._send({"type": "subscription.gap", "reason": reason})
                for item in page:
                    pause = 0.002
                    while self.out_bytes > self.limit // 2 and self._ending is None:
                        await asyncio.sleep(pause)
                        pause = min(pause * 2, 0.05)
                    if self._ending is not None:
                        return
                    self._queue_replayed(item)
        except Exception as exc:  # the database away: say so, the live feed goes on
            await self._send({"type": "error", "op": "subscribe", "error": f"replay: {exc}"})
        finally:
            self.resume.replaying -= 1
            if not self.resume.replaying:
                for item in self.resume.release():
                    if not self._queue(item):
                        self._end(WS_TRY_LATER, "too slow: the replay's backlog")
                        break

    def _queue_replayed(self, item: Delivery) -> None:
        frame = _frame(_payload(item))
        if self.out is None:
            self.out = collections.deque()
        self.out.append(frame)
        self.out_bytes += len(frame)
        self._write_soon()

    async def _send(self, doc: dict[str, Any]) -> None:
        await self.ws.send_str(encoder.encode(doc).decode())

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
            if op.since is not None:
                await self._replay(channels, op.since)
        else:
            self._give_back(channels, patterns)
            await self.pubsub.ask(Unsubscribe(self.sub, channels, patterns), timeout=10)
            await self._send({"type": "unsubscribed", "channels": channels, "patterns": patterns})
