"""``POST /publish`` and ``GET /ws`` (DESIGN §8): Redis pub/sub over HTTP.
Who may publish and see what: ``channels``; one WebSocket client: ``ws_session``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import structlog
from aiohttp import WSMsgType, web

from actors.data.model import Principal
from actors.pubsub import Publish
from jarvisd.http.auth import Unauthorized, authenticate, bearer, forbidden, require
from jarvisd.http.channels import Channel, Rules
from jarvisd.http.common import RouteDoc, actors_of, body, reply
from jarvisd.http.errors import ProblemError, reject_unknown_params
from jarvisd.http.keys import HTTP_METRICS, RUNTIME, SHARES
from jarvisd.http.middleware import UNAVAILABLE
from jarvisd.http.shares import Full, Shares, client_address, principal_key
from jarvisd.http.ws_session import Session
from jarvisd.http.ws_wire import (
    WS_INTERNAL,
    WS_POLICY,
    WS_TRY_LATER,
    close_within,
    encoder,
    op_decoder,
)

__all__ = ["ROUTES", "websocket"]

log = structlog.get_logger("jarvisd", actor="http")
AUTH_WAIT = 10.0


class PublishBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    channel: Channel
    message: Any  # any JSON value; published as its JSON text


class Published(msgspec.Struct, frozen=True):
    channel: str
    receivers: int


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
    receivers = await actors_of(request).pubsub.ask(Publish(b.channel, data))
    return reply(Published(b.channel, receivers))


async def websocket(request: web.Request) -> web.StreamResponse:
    """Authenticate (the upgrade's header, else the first frame), take the
    caller's place, then serve the socket. One coroutine to the session's
    own: thousands of sockets each hold the frames of this chain."""
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
    shares, http = request.app[SHARES], rt.settings.http
    place: str | None = None  # the principal whose WebSocket place this one holds
    who: Principal | None = None
    metrics.websockets += 1
    try:
        # Invalidations from here on, before the socket follows its credential,
        # are not missed: the session checks again if any came (``since``).
        since = rt.principals.generation
        who = await authenticate(request)  # 401 for bad credentials; none: an auth op first
        token = bearer(request)
        if who is not None:
            try:
                place = _take_place(shares, who, http.max_websockets_per_principal)
            except Full as exc:
                raise _too_many(exc) from None
            await ws.prepare(request)
        else:
            try:
                authed = await _wait_for_auth(request, ws)
            except Full as exc:
                raise _too_many(exc) from None
            if authed is None:
                return ws
            who, token = authed
            try:
                place = _take_place(shares, who, http.max_websockets_per_principal)
            except Full as exc:
                await ws.close(code=WS_POLICY, message=str(exc).encode()[:120])
                return ws
            try:
                await ws.send_str(
                    encoder.encode({"type": "authenticated", "user": who.name}).decode()
                )
            except ConnectionResetError:
                return ws  # gone right after authenticating
        await Session(rt, request, ws, who, token).run(since)
        return ws
    except Exception as exc:
        if not ws.prepared:
            raise  # still HTTP: the middleware answers with a problem document
        # Upgraded: an HTTP answer now would be garbage on the socket.
        await _close_failed(request, ws, exc, who)
        return ws
    finally:
        metrics.websockets -= 1
        if place is not None:
            shares.give(shares.websockets, place)


def _all_of(exc: Exception, kinds: type[Exception] | tuple[type[Exception], ...]) -> bool:
    """``exc`` is one of ``kinds``, or a group of nothing else (a TaskGroup's)."""
    if isinstance(exc, ExceptionGroup):
        _match, rest = exc.split(kinds)
        return rest is None
    return isinstance(exc, kinds)


async def _close_failed(
    request: web.Request, ws: web.WebSocketResponse, exc: Exception, who: Principal | None
) -> None:
    """An upgraded socket whose serving failed: a client already gone is let
    go; a dependency down or a full mailbox closes it with 1013 (try again);
    anything else is a fault of the daemon's, logged, and closes it with 1011."""
    user = who.name if who else None
    if _all_of(exc, ConnectionError):
        log.info("ws_client_gone", user=user)
        if request.transport is not None:
            request.transport.abort()
    elif _all_of(exc, UNAVAILABLE):
        log.warning("ws_unavailable", user=user, error=f"{type(exc).__name__}: {exc}")
        await close_within(request, ws, WS_TRY_LATER, "service unavailable, try again")
    else:
        log.exception("ws_session_failed", user=user, exc_info=exc)
        await close_within(request, ws, WS_INTERNAL, "internal error")


async def _wait_for_auth(
    request: web.Request, ws: web.WebSocketResponse
) -> tuple[Principal, str] | None:
    """A socket without credentials holds a place until its first frame: at
    most a tenth of all places, and a share of them per client address."""
    rt = request.app[RUNTIME]
    metrics, shares, http = request.app[HTTP_METRICS], request.app[SHARES], rt.settings.http
    waiting = max(1, http.max_websockets // 10)
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
    with shares.hold(
        shares.unauthenticated,
        client_address(request, http),
        http.max_unauthenticated_per_address,
        "http.max_unauthenticated_per_address",
    ):
        metrics.websockets_unauthenticated += 1
        try:
            await ws.prepare(request)
            return await _first_auth(request, ws)
        finally:
            metrics.websockets_unauthenticated -= 1


def _too_many(exc: Full) -> ProblemError:
    return ProblemError(429, "Too many requests", str(exc), headers={"Retry-After": "5"})


def _take_place(shares: Shares, who: Principal, limit: int) -> str:
    """A WebSocket place of ``who``'s share; returns whose, to give back."""
    key = principal_key(who)
    shares.take(shares.websockets, key, limit, "http.max_websockets_per_principal")
    return key


async def _first_auth(
    request: web.Request, ws: web.WebSocketResponse
) -> tuple[Principal, str] | None:
    """Browsers cannot send headers with a WebSocket: the first frame may be
    {"op": "auth", "token": …}. Returns the caller and the token."""
    try:
        async with asyncio.timeout(AUTH_WAIT):
            msg = await ws.receive()
        op = op_decoder.decode(msg.data) if msg.type == WSMsgType.TEXT else None
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
    return who, op.token


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
