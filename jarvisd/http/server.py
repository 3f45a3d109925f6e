"""The HTTP actor: an aiohttp AppRunner we own (no run_app: the daemon owns
the signals), a TCP site and an optional Unix-socket site (DESIGN §8)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import asyncpg
import msgspec
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from actors import ActorDead, ActorStopped, AskTimeout, FatalActorError, MailboxFull
from actors.approvals import WatchersFull
from actors.cache import CacheError
from actors.data.repo import Conflict, Forbidden, Invalid, NotFound
from actors.kernel import Actor, Health
from actors.persistence import Unavailable
from actors.pubsub import Detach, Subscribe, Subscriber
from actors.redis_link import RedisUnavailable
from actors.sessions import SessionConflict, SessionNotFound
from jarvisd.http import api, health, openapi
from jarvisd.http.auth import Unauthorized, authenticate, known
from jarvisd.http.common import ClientGone
from jarvisd.http.errors import ProblemError, problem
from jarvisd.http.followers import Followers
from jarvisd.http.keys import ADMITTED, FOLLOWERS, HTTP_METRICS, RUNTIME, SHARES
from jarvisd.http.metrics import HttpMetrics
from jarvisd.http.shares import Shares
from jarvisd.lists import ListCache
from jarvisd.principals import PrincipalCache, internal_channel
from jarvisd.runtime import Runtime

__all__ = ["HttpServer", "build_app"]

log = structlog.get_logger("jarvisd", actor="http")  # lazy: follows configure()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Served while draining, so orchestration can watch the daemon go away.
ALWAYS_SERVED = frozenset({"/health/live", "/health/ready", "/health", "/metrics", "/stats"})
# Open by default; behind authentication with http.public_health = false.
GUARDED_HEALTH = frozenset(
    {"/health/ready", "/health", "/stats", "/metrics", "/redis/health", "/redis/stats"}
)
# With public_health = false those ask for a token, which may mean a database
# lookup: the ones always served stay outside http.max_in_flight (monitoring
# goes on under overload), and those that need a lookup have this budget.
GUARDED_IN_FLIGHT = 64
MAX_UNIX_PATH = 107
BODY_CEILING = 64 * 1024 * 1024


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[HTTP_METRICS]
    rt = request.app[RUNTIME]
    started = time.perf_counter()
    status = 500
    metrics.in_flight += 1
    # Requests count against http.max_in_flight, health aside (always
    # answered) and WebSockets (capped on their own); a long-poll gives its
    # place back once it starts waiting (release_admission).
    admitted = request.path not in ALWAYS_SERVED and request.path != "/ws"
    if admitted:
        metrics.admitted += 1
        request[ADMITTED] = True
    try:
        limit = rt.settings.http.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            response: web.StreamResponse = problem(
                413,
                "Payload too large",
                f"request body of {request.content_length} bytes is over "
                f"the limit of {limit} bytes (http.max_body_bytes)",
            )
        elif admitted and metrics.admitted > rt.settings.http.max_in_flight:
            response = _overloaded(
                request,
                f"over {rt.settings.http.max_in_flight} requests in progress (http.max_in_flight)",
            )
        elif not rt.settings.http.public_health and request.path in GUARDED_HEALTH:
            response = await _guarded_health(request, handler)
        elif rt.draining and request.path not in ALWAYS_SERVED:
            response = problem(
                503, "Draining", "jarvisd is shutting down", headers={"Retry-After": "5"}
            )
        else:
            response = await _guarded(request, handler)
        status = response.status
        return response
    finally:
        metrics.in_flight -= 1
        if request.get(ADMITTED):
            metrics.admitted -= 1
        metrics.observe(request.method, _route_name(request), status, time.perf_counter() - started)


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProblemError as exc:
        return exc.response()
    except web.HTTPRequestEntityTooLarge as exc:
        return problem(
            413, "Payload too large", exc.text or "request body over http.max_body_bytes"
        )
    except web.HTTPException as exc:
        if exc.status >= 400:
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            detail = f"{request.method} {request.path}: {exc.reason.lower()}"
            return problem(exc.status, exc.reason, detail, headers=allow)
        raise
    except (NotFound, SessionNotFound) as exc:
        return problem(404, "Not found", str(exc).strip("'\""))
    except Conflict as exc:
        extra = {"current": msgspec.to_builtins(exc.current)} if exc.current is not None else None
        return problem(409, "Conflict", str(exc), extra=extra)
    except SessionConflict as exc:
        return problem(409, "Conflict", str(exc), extra={"currentVersion": exc.current})
    except Forbidden as exc:
        return problem(403, "Forbidden", str(exc))
    except (Invalid, CacheError) as exc:
        return problem(400, "Bad request", str(exc))
    except asyncpg.DataError as exc:
        # Input the schema let through but PostgreSQL cannot store (NUL in text, \u0000 in JSON, ...).
        return problem(400, "Invalid data", exc.args[0] if exc.args else type(exc).__name__)
    except UnicodeError:
        return problem(400, "Invalid data", "text that is not valid Unicode")
    except ClientGone:
        log.info("http_client_gone", route=_route_name(request), method=request.method)
        return problem(400, "Bad request", "the client closed the connection")
    except (
        MailboxFull,
        ActorDead,
        ActorStopped,
        AskTimeout,
        Unavailable,
        RedisUnavailable,  # the cache's and the sessions' too
        WatchersFull,
    ) as exc:
        return problem(503, "Service unavailable", str(exc), headers={"Retry-After": "1"})
    except Exception:
        # The route's template, never the path: a path may hold a session id.
        log.exception("http_handler_failed", route=_route_name(request), method=request.method)
        return problem(500, "Internal error", "the request failed; the daemon log has the details")


def _overloaded(request: web.Request, why: str) -> web.Response:
    request.app[HTTP_METRICS].refused += 1
    return problem(503, "Overloaded", f"{why}; try again shortly", headers={"Retry-After": "1"})


async def _guarded_health(request: web.Request, handler: Handler) -> web.StreamResponse:
    if known(request):  # no lookup to bound: a monitor already known always gets in
        return await _guarded(request, _authenticated(handler))
    metrics = request.app[HTTP_METRICS]
    if metrics.guarded >= GUARDED_IN_FLIGHT:
        return _overloaded(
            request, f"{GUARDED_IN_FLIGHT} authenticated health requests are in progress"
        )
    metrics.guarded += 1
    try:
        return await _guarded(request, _authenticated(handler))
    finally:
        metrics.guarded -= 1


def _authenticated(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if await authenticate(request) is None:
            raise Unauthorized("authentication required (http.public_health = false)")
        return await handler(request)

    return guarded


def build_app(runtime: Runtime) -> web.Application:
    # aiohttp's own limit is a fixed ceiling; the configured (reloadable) limit
    # is enforced by _observe on Content-Length; body readers check it too.
    app = web.Application(middlewares=[_observe], client_max_size=BODY_CEILING)
    app[RUNTIME] = runtime
    app[HTTP_METRICS] = HttpMetrics()
    app[FOLLOWERS] = Followers(runtime.principals)
    app[SHARES] = Shares()
    health.add_routes(app)
    api.add_routes(app)
    openapi.add_routes(app)
    return app


class HttpServer(Actor):
    def __init__(self, runtime: Runtime, *, sockets: list[socket.socket] | None = None) -> None:
        super().__init__("http", mailbox_size=16)
        self.runtime = runtime
        self.sockets = sockets or []
        self.runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self.addresses: list[str] = []

    async def on_start(self) -> None:
        s = self.runtime.settings.http
        self.app = build_app(self.runtime)
        self.runner = _Runner(
            self.app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=self.runtime.settings.daemon.shutdown_timeout,
            # aiohttp closes a connection whose request head has not come in
            # within this time: the header read timeout, and the idle timeout.
            keepalive_timeout=s.idle_timeout,
        )
        await self.runner.setup()
        try:
            await self._bind(s.host, s.port, s.unix_socket)
        except BaseException:
            await self.runner.cleanup()
            self.runner = None
            raise
        log.info("http_listening", addresses=self.addresses)

    async def _bind(self, host: str, port: int, unix_socket: str | None) -> None:
        assert self.runner is not None
        sites: list[web.BaseSite] = []
        if self.sockets:
            sites += [web.SockSite(self.runner, sock) for sock in self.sockets]
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
        for site in self.runner.sites:
            server = getattr(site, "_server", None)
            if server is not None and getattr(server, "sockets", None):
                for sock in server.sockets:
                    if sock.family in (socket.AF_INET, socket.AF_INET6):
                        return int(sock.getsockname()[1])
        return None

    async def check(self) -> Health | None:
        return Health(status="pass", detail=", ".join(self.addresses))

    async def run(self) -> None:
        """Keep the in-memory caches subscribed to what invalidates them: the
        principal cache to ``{prefix}internal:principals``, the list cache to
        ``{prefix}events``. While a subscription is down its cache is not used."""
        rt = self.runtime
        prefix = rt.settings.redis.prefix
        await asyncio.gather(
            self._watch(internal_channel(prefix), rt.principals),
            self._watch(f"{prefix}events", rt.lists),
            self._close_stalled(),
        )

    async def _close_stalled(self) -> None:
        """A peer that reads nothing keeps its connection, and the bytes
        queued for it, for ever (a connection closed by the daemon waits for
        its buffer to empty first): a connection whose unsent bytes have not
        gone down for http.idle_timeout seconds is aborted."""
        seen: dict[RequestHandler, _Unsent] = {}
        while not self.halting():
            limit = self.runtime.settings.http.idle_timeout
            await asyncio.sleep(max(0.25, min(1.0, limit / 4)))
            try:
                seen = self._sweep(seen, limit)
            except Exception:  # a sweep that fails must not take the listeners down
                log.exception("http_stalled_sweep_failed")

    def _sweep(
        self, seen: dict[RequestHandler, _Unsent], limit: float
    ) -> dict[RequestHandler, _Unsent]:
        server = self.runner.server if self.runner is not None else None
        if server is None or self.app is None:
            return {}
        now = time.monotonic()
        still: dict[RequestHandler, _Unsent] = {}
        for handler in server.connections:
            # handler.transport is None once aiohttp has closed the connection;
            # the transport lives on while it still has bytes to send.
            transport = getattr(handler, "raw_transport", None)
            if transport is None:
                continue
            size = transport.get_write_buffer_size()
            if size == 0:
                continue
            before = seen.get(handler)
            if before is None or size < before.size:  # new, or the peer took some
                still[handler] = _Unsent(size, now)
            elif now - before.since < limit:
                still[handler] = _Unsent(size, before.since)
            else:
                transport.abort()
                self.app[HTTP_METRICS].stalled_closed += 1
                log.info("http_stalled_reader_closed", unsent=size)
        return still

    async def _watch(self, channel: str, cache: PrincipalCache | ListCache) -> None:
        pubsub = self.runtime.actor("pubsub")
        while not self.halting():
            lost = asyncio.Event()
            sub = Subscriber(f"cache:{channel}", sink=cache.on_delivery, on_close=_setter(lost))
            try:
                await pubsub.ask(Subscribe(sub, channels=(channel,)), timeout=10)
            except Exception as exc:  # pub/sub not connected (yet): the cache stays off
                log.debug("cache_subscription_waiting", channel=channel, error=repr(exc))
                with contextlib.suppress(Exception):
                    await pubsub.ask(Detach(sub), timeout=2)
                await asyncio.sleep(0.5)
                continue
            cache.enable()
            try:
                await lost.wait()
            finally:
                cache.disable()

    async def wait_idle(self, timeout: float) -> int:
        """Wait until no request is in flight, up to ``timeout``; return how many remain."""
        assert self.app is not None
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


@dataclass(slots=True)
class _Unsent:
    size: int  # bytes waiting to be sent, when last looked at
    since: float  # monotonic time since when they have not gone down


class _RequestHandler(RequestHandler):
    """Requests aiohttp cannot parse (bad request line, header, framing) get a
    problem document like every other error, and one log line that names the
    error's type only: aiohttp's messages quote the offending bytes, which may
    be a credential. The transport is kept for the stalled-peer sweep."""

    raw_transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if isinstance(transport, asyncio.WriteTransport):
            self.raw_transport = transport

    def connection_lost(self, exc: BaseException | None) -> None:
        self.raw_transport = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error = type(exc).__name__ if exc is not None else "unknown"
        if status >= 500:
            log.error("http_internal_error", status=status, error=error)
        else:
            log.info("http_bad_request", status=status, error=error, remote=request.remote)
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; it cannot become an error")
        title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        detail = (
            f"the request is not valid HTTP/1.1 ({error})"
            if status < 500
            else "the request failed; the daemon log has the details"
        )
        resp = problem(status, title, detail)
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    """An AppRunner whose connections use _RequestHandler."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # same state, our handler factory
        return server


def _setter(event: asyncio.Event) -> Callable[[str], None]:
    def on_close(_reason: str) -> None:
        event.set()

    return on_close


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
