"""The HTTP actor: an aiohttp AppRunner we own (no run_app: the daemon owns
the signals), a TCP site and an optional Unix-socket site, or the sockets
systemd passed (DESIGN §8). It runs under the supervisor like every actor:
a crash closes the listeners and the restart opens them again.

Beside serving, it keeps the in-memory caches subscribed to what invalidates
them, and closes connections whose peer stopped reading.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import weakref
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from actors import Actor, FatalActorError, Health
from actors.pubsub import Subscription, changes_channel
from jarvisd.http import api, console, health, openapi
from jarvisd.http.followers import Followers
from jarvisd.http.keys import FOLLOWERS, HTTP_METRICS, RUNTIME, SHARES, TRANSPORTS
from jarvisd.http.metrics import HttpMetrics
from jarvisd.http.middleware import observe
from jarvisd.http.shares import Shares
from jarvisd.lists import ListCache
from jarvisd.principals import PrincipalCache, internal_channel
from jarvisd.runtime import Runtime

__all__ = ["HttpServer", "build_app"]

log = structlog.get_logger("jarvisd", actor="http")  # lazy: follows configure()
MAX_UNIX_PATH = 107
BODY_CEILING = 64 * 1024 * 1024


def build_app(runtime: Runtime) -> web.Application:
    # aiohttp's own limit is a fixed ceiling; the configured (reloadable) limit
    # is enforced by the middleware on Content-Length; body readers check it too.
    app = web.Application(middlewares=[observe], client_max_size=BODY_CEILING)
    app[RUNTIME] = runtime
    app[HTTP_METRICS] = HttpMetrics()
    app[FOLLOWERS] = Followers(runtime.principals)
    app[SHARES] = Shares()
    app[TRANSPORTS] = weakref.WeakSet()
    health.add_routes(app)
    api.add_routes(app)
    openapi.add_routes(app)
    console.add_routes(app)
    return app


class _ProtocolLog(logging.Filter):
    """aiohttp's server logger, for requests it cannot parse (bad request
    line, header, framing) and handler failures past the middleware. Its
    messages quote the offending bytes, which may be a credential: each
    record becomes one line naming the error's type, and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        error = type(exc).__name__ if exc is not None else "unknown"
        if exc is None or isinstance(exc, HttpProcessingError):
            log.info("http_bad_request", error=error)
        else:
            log.error("http_internal_error", error=error)
        return False  # the record itself is never written


_protocol_log = logging.getLogger("jarvisd.http.protocol")
_protocol_log.propagate = False
_protocol_log.setLevel(logging.DEBUG)
_protocol_log.addFilter(_ProtocolLog())


class HttpServer(Actor):
    def __init__(self, runtime: Runtime, *, sockets: list[socket.socket] | None = None) -> None:
        super().__init__("http", mailbox_size=16)
        self.runtime = runtime
        self.sockets = sockets or []
        self.runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self.addresses: list[str] = []
        # With http.port 0 the port bound first is kept across restarts.
        self._port: int | None = None
        prefix = runtime.settings.redis.prefix
        # The principal cache follows {prefix}internal:principals, the list
        # cache {prefix}internal:changes (told once per batch of events
        # relayed): while a subscription is down its cache is off.
        self.subscriptions = [
            _cache_subscription(runtime, internal_channel(prefix), runtime.principals),
            _cache_subscription(runtime, changes_channel(prefix), runtime.lists),
        ]

    async def on_start(self) -> None:
        s = self.runtime.settings.http
        self.app = build_app(self.runtime)
        self.runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            logger=_protocol_log,
            # In-flight requests get this long to finish when the actor stops.
            shutdown_timeout=min(self.runtime.settings.daemon.shutdown_timeout / 2, 5.0),
            # aiohttp closes a connection whose request head has not come in
            # within this time: the header read timeout, and the idle timeout.
            keepalive_timeout=s.idle_timeout,
        )
        await self.runner.setup()
        self.addresses = []
        try:
            await self._bind(s.host, self._port or s.port, s.unix_socket)
            self._port = self._port or self.bound_port
        except BaseException:
            await self.runner.cleanup()
            self.runner = None
            raise
        log.info("http_listening", addresses=self.addresses)

    async def _bind(self, host: str, port: int, unix_socket: str | None) -> None:
        assert self.runner is not None
        sites: list[web.BaseSite] = []
        if self.sockets:
            # Copies: a site closes its socket when it stops, and a restart
            # of this actor listens on the sockets systemd passed again.
            sites += [web.SockSite(self.runner, sock.dup()) for sock in self.sockets]
        else:
            sites.append(web.TCPSite(self.runner, host, port, reuse_address=True))
            if unix_socket:
                if len(os.fsencode(unix_socket)) > MAX_UNIX_PATH:
                    raise FatalActorError(
                        f"http.unix_socket path is longer than {MAX_UNIX_PATH} bytes: {unix_socket}"
                    )
                os.makedirs(os.path.dirname(unix_socket) or ".", exist_ok=True)
                if os.path.exists(unix_socket) and not _socket_in_use(unix_socket):
                    os.unlink(unix_socket)  # stale, left by a daemon that was killed
                sites.append(web.UnixSite(self.runner, unix_socket))
        for site in sites:
            try:
                await site.start()
            except OSError as exc:
                raise FatalActorError(
                    f"cannot listen on {site.name}: {exc.strerror or exc}"
                ) from exc
            self.addresses.append(site.name)
        if unix_socket and not self.sockets:
            os.chmod(unix_socket, 0o660)

    @property
    def bound_port(self) -> int | None:
        """The TCP port actually bound (useful with port 0)."""
        if self.runner is None:
            return None
        for address in self.runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                return int(address[1])
        return None

    async def check(self) -> Health | None:
        return Health(status="pass", detail=", ".join(self.addresses))

    async def run(self) -> None:
        for sub in self.subscriptions:
            self.spawn(sub.keep(), sub.name)
        await self._close_stalled()

    async def _close_stalled(self) -> None:
        """A peer that reads nothing keeps its connection, and the bytes
        queued for it, for ever (a connection closed by the daemon waits for
        its buffer to empty first): a connection whose unsent bytes have not
        gone down for http.idle_timeout seconds is aborted."""
        seen: dict[Any, _Unsent] = {}
        while not self.halting():
            limit = self.runtime.settings.http.idle_timeout
            await asyncio.sleep(max(0.25, min(1.0, limit / 4)))
            seen = self._sweep(seen, limit)

    def _sweep(self, seen: dict[Any, _Unsent], limit: float) -> dict[Any, _Unsent]:
        if self.app is None:
            return {}
        now = time.monotonic()
        still: dict[Any, _Unsent] = {}
        watched = self.app[TRANSPORTS]
        for transport in tuple(watched):
            if not isinstance(transport, asyncio.WriteTransport):
                continue
            size = transport.get_write_buffer_size()
            if size == 0:
                continue
            before = seen.get(transport)
            if before is None or size < before.size:  # new, or the peer took some
                still[transport] = _Unsent(size, now)
            elif now - before.since < limit:
                still[transport] = _Unsent(size, before.since)
            else:
                transport.abort()
                self.app[HTTP_METRICS].stalled_closed += 1
                log.info("http_stalled_reader_closed", unsent=size)
        return still

    async def wait_idle(self, timeout: float) -> int:
        """Wait until no request is in flight, up to ``timeout``; return how many remain."""
        if self.app is None:
            return 0
        metrics = self.app[HTTP_METRICS]
        deadline = time.monotonic() + timeout
        while metrics.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return metrics.in_flight

    async def on_stop(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()
        unix_socket = self.runtime.settings.http.unix_socket
        if unix_socket and not self.sockets and os.path.exists(unix_socket):
            os.unlink(unix_socket)


def _cache_subscription(
    runtime: Runtime, channel: str, cache: PrincipalCache | ListCache
) -> Subscription:
    return Subscription(
        runtime.pubsub.bind(timeout=10, edge=False),
        f"cache:{channel}",
        sink=cache.on_delivery,
        channels=lambda: (channel,),
        on_up=cache.enable,
        on_down=cache.disable,
    )


@dataclass(slots=True)
class _Unsent:
    size: int  # bytes waiting to be sent, when last looked at
    since: float  # monotonic time since when they have not gone down


def _socket_in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
