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
from typing import Any

import msgspec
import structlog
from aiohttp import WSMsgType, web

from actors.data.model import Principal
from actors.pubsub import Delivery, Detach, Subscribe, Subscriber, Unsubscribe
from jarvisd.http.channels import rules_of
from jarvisd.http.keys import FOLLOWERS, SHARES
from jarvisd.http.shares import principal_key
from jarvisd.http.ws_credential import CredentialWatch
from jarvisd.http.ws_replay import Resume
from jarvisd.http.ws_wire import (
    MAX_SUBSCRIPTIONS,
    WS_GOING_AWAY,
    WS_TRY_LATER,
    Op,
    close_within,
    delivery_frame,
    delivery_payload,
    encoder,
    op_decoder,
    text_frame,
)
from jarvisd.principals import bearer_key
from jarvisd.runtime import Runtime

__all__ = ["Session"]

log = structlog.get_logger("jarvisd", actor="http")


class Session:
    """One WebSocket client. Ops are read in the request's task; deliveries
    are written by the pub/sub actor, straight to the socket, as they arrive
    (no task, no copy per client): a client whose socket buffer passes
    ``pubsub.client_buffer_bytes`` is closed with 1013."""

    # Slots: thousands of sessions, each without a dict of its own.
    __slots__ = (
        "_ending",
        "_tasks",
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
        "watch",
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
        self.watch = CredentialWatch(rt, self, token) if token is not None else None
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
        frame = delivery_frame(item)
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

    def spawn(self, coro: Any, name: str) -> asyncio.Task[None] | None:
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
            self._writer = self.spawn(self._write(), "ws.write")

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
        self.end(code, reason)

    def end(self, code: int, reason: str) -> None:
        if self._ending is None and not self.ws.closed:
            self._ending = (code, reason)
            self.spawn(close_within(self.request, self.ws, code, reason), "ws.close")

    # -- following the credential (ws_credential) -----------------------------------------
    def recheck_soon(self) -> None:
        """An invalidation named this socket's user or credential."""
        if self.watch is not None:
            self.watch.soon()

    @property
    def ending(self) -> bool:
        return self._ending is not None

    async def new_role(self, who: Principal) -> None:
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

    async def run(self, since: int) -> None:
        """Serve the socket; ``since``: the caller cache's generation when
        the credential was checked (anything invalidated after, checked again)."""
        followers = self.request.app[FOLLOWERS]
        followers.add(self)
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                if self.watch is not None:
                    self.watch.start(check_now=self.rt.principals.generation != since)
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
                    if self.watch is not None:
                        self.watch.stop()
                    if self._writer is not None:
                        self._writer.cancel()
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
                        self.end(WS_TRY_LATER, "too slow: the replay's backlog")
                        break

    def _queue_replayed(self, item: Delivery) -> None:
        frame = text_frame(delivery_payload(item))
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
