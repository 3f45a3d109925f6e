"""What every route module shares: the route record (router and OpenAPI),
JSON replies, body decoding with its limits, path ids, list queries, and the
ask that reaches an actor."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from actors.data.listing import ListError, ListSpec, parse_integer, parse_list
from actors.data.model import StoredInput, nul_path
from config.explain import explain
from jarvisd.http.errors import ProblemError
from jarvisd.http.keys import RUNTIME
from jarvisd.runtime import Runtime

__all__ = [
    "MAX_JSON_DEPTH",
    "RouteDoc",
    "actors_of",
    "body",
    "list_query",
    "listed",
    "path_id",
    "query_param",
    "reply",
]

T = TypeVar("T")
_encoder = msgspec.json.Encoder()
# Deeper JSON is refused: nothing jarvisd stores needs it, and deep values
# cost recursion in every decoder that reads them back (PostgreSQL, Python).
MAX_JSON_DEPTH = 64
MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class RouteDoc:
    """One route, for the router and for /openapi.json."""

    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    body: type | None = None
    response: Any = None
    status: int = 200
    list_spec: ListSpec | None = None
    # Query parameters beside a list's: (name, JSON schema, description).
    query: tuple[tuple[str, dict[str, Any], str], ...] = ()
    # Extra statuses this route answers, beyond the common ones (for the document).
    statuses: tuple[int, ...] = ()
    body_required: bool = True
    # Another content type the success response may have (e.g. raw bytes).
    raw_content: str | None = None


def reply(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=_encoder.encode(obj), content_type="application/json", headers=headers
    )


async def _read(request: web.Request, limit: int) -> bytes:
    raw = bytearray()
    try:
        async for chunk in request.content.iter_chunked(65536):
            raw += chunk
            if len(raw) > limit:
                raise ProblemError(
                    413, "Payload too large", f"request body is over the limit of {limit} bytes"
                )
    except (RequestPayloadError, HttpProcessingError) as exc:
        # Bad framing or a Content-Encoding the body does not match.
        raise ProblemError(
            400, "Bad request", f"the body cannot be read: {type(exc).__name__}"
        ) from None
    except ConnectionError:
        raise ClientGone() from None
    return bytes(raw)


class ClientGone(Exception):
    """The client closed the connection before its request was read: nobody
    is there to answer (HTTP logs it briefly, answers 400 to nobody)."""


def _check_content_type(request: web.Request) -> None:
    ctype = request.content_type
    charset = request.charset
    if not (
        ctype == "application/json"
        or (ctype.startswith("application/") and ctype.endswith("+json"))
    ):
        raise ProblemError(
            415, "Unsupported media type", f"send the body as application/json, not {ctype[:80]}"
        )
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise ProblemError(415, "Unsupported media type", "JSON bodies are UTF-8")


def _depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether the JSON in ``raw`` nests deeper than ``limit``. Bodies with few
    brackets (nearly all) are cleared by counting alone."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    stack: list[tuple[Any, int]] = [(msgspec.json.decode(raw), 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _body_required(typ: Any) -> str:
    """What a request without a body lacks: the fields it must send."""
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        needed = [f.encode_name for f in msgspec.structs.fields(typ) if f.required]
        if needed:
            example = ", ".join(f'"{n}": …' for n in needed)
            verb = "is" if len(needed) == 1 else "are"
            return f"{' and '.join(needed)} {verb} required: send a JSON body {{{example}}}"
    return "a JSON body is required"


async def body(request: web.Request, typ: type[T]) -> T:
    """The JSON body decoded as ``typ``: 400 without one, 415 unless it is sent as UTF-8
    application/json, 413 over http.max_body_bytes, 408 when it does not
    arrive within http.request_timeout, 400 for anything that is not valid
    UTF-8 JSON of that shape or nests deeper than MAX_JSON_DEPTH."""
    settings = request.app[RUNTIME].settings.http
    if not request.can_read_body:
        raise ProblemError(400, "Bad request", _body_required(typ))
    _check_content_type(request)
    try:
        async with asyncio.timeout(settings.request_timeout):
            raw = await _read(request, settings.max_body_bytes)
    except TimeoutError:
        raise ProblemError(
            408,
            "Request timeout",
            f"the request body did not arrive within {settings.request_timeout:g} s",
        ) from None
    if not raw:
        raise ProblemError(400, "Bad request", _body_required(typ))
    try:
        raw.decode()  # strict UTF-8 (RFC 8259), even in parts the type skips
        if _depth_exceeds(raw, MAX_JSON_DEPTH):
            raise ProblemError(
                400, "Invalid JSON", f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
            )
        decoded = _decode(raw, typ)
        if b"\\u0000" in raw and isinstance(typ, type) and issubclass(typ, StoredInput):
            # PostgreSQL stores no NUL in text or jsonb: say where, before it refuses.
            where = nul_path(msgspec.json.decode(raw))
            if where is not None:
                raise ProblemError(
                    400,
                    "Invalid body",
                    f"NUL character (\\u0000) at {where[:200]}: it cannot be stored",
                )
        return decoded
    except msgspec.ValidationError as exc:
        raise ProblemError(400, "Invalid body", explain(exc)) from None
    except msgspec.DecodeError as exc:
        raise ProblemError(400, "Invalid JSON", str(exc)) from None
    except UnicodeError:
        raise ProblemError(400, "Invalid JSON", "the body is not valid UTF-8") from None
    except RecursionError:
        raise ProblemError(400, "Invalid JSON", "JSON nested too deeply") from None


_FLOAT_FOR_INT = re.compile(r"^Expected `int[^`]*`, got `float` - at `\$((?:\.\w+|\[\d+\])*)`$")
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")


def _decode(raw: bytes, typ: type[T]) -> T:
    """Decode ``raw`` as ``typ``. A number with a zero fraction (``97.0``) is an
    integer in JSON Schema, so where ``typ`` wants an int it is taken as one;
    a number with a fraction still is not."""
    try:
        return msgspec.json.decode(raw, type=typ)
    except msgspec.ValidationError as first:
        error: msgspec.ValidationError = first
    data: Any = msgspec.json.decode(raw)
    for _ in range(64):  # one integral float fixed per round
        m = _FLOAT_FOR_INT.match(str(error))
        if m is None:
            raise error
        parent: Any = None
        step: str | int | None = None
        node = data
        for name, index in _STEP.findall(m.group(1)):
            parent, step = node, (name if name else int(index))
            node = node[step]
        if not isinstance(node, float) or not node.is_integer() or parent is None:
            raise error
        parent[step] = int(node)
        try:
            return msgspec.convert(data, type=typ)
        except msgspec.ValidationError as again:
            error = again
    raise error


async def optional_body(request: web.Request, typ: type[T], default: T) -> T:
    """The body decoded as ``typ`` if there is one, else ``default``."""
    if not request.can_read_body:
        return default
    return await body(request, typ)


def path_id(request: web.Request, name: str = "id") -> int:
    """A row id from the path; anything else (or too large) is "not found"."""
    raw = request.match_info[name]
    value = parse_integer(raw) if len(raw) <= 40 else None
    if value is None or not 0 < value <= MAX_ID:
        raise ProblemError(404, "Not found", f"no such {name}: {raw[:40]!r}")
    return value


def query_param(request: web.Request, name: str, default: str | None = None) -> str | None:
    """A query parameter given at most once (twice is a 400, as in list queries)."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise ProblemError(400, "Bad request", f"give {name} once")
    return values[0] if values else default


def list_query(
    request: web.Request, spec: ListSpec, forced: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    query = {k: request.query.getall(k) for k in request.query}
    try:
        lq = parse_list(spec, query, forced=forced)
    except ListError as exc:
        raise ProblemError(400, "Invalid list request", str(exc)) from None
    prefer = request.headers.get("Prefer", "")
    count = None
    for part in prefer.split(","):
        key, _, value = part.strip().partition("=")
        if key == "count" and value in ("exact", "estimated"):
            count = value
    return lq, count


def listed(page: Any, count: str | None) -> web.Response:
    headers = {"Preference-Applied": f"count={count}"} if count else None
    return reply(page, headers=headers)


def actors_of(request: web.Request) -> Runtime:
    """The running daemon, whose typed references (``.persistence``,
    ``.cache``, …) reach its actors from a route: an ask never waits for room
    in a full mailbox (503 at once) and times out after http.request_timeout."""
    return request.app[RUNTIME]
