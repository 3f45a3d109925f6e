"""What every repository module shares: the errors the API maps to statuses,
the connection set-up, and one page of a list query."""

from __future__ import annotations

import functools
import json
import types
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from actors.data.listing import ListQuery, ListSpec, count_sql, encode_cursor, select_sql
from actors.data.model import Page

__all__ = [
    "Conflict",
    "Expired",
    "Forbidden",
    "Invalid",
    "JsonPage",
    "NotFound",
    "init_connection",
    "json_page",
    "page",
]


class NotFound(LookupError):
    """No such row, or one the caller may not see (HTTP 404)."""


class Conflict(Exception):
    """The change conflicts with the current state (HTTP 409)."""

    def __init__(self, message: str, current: Any = None) -> None:
        super().__init__(message)
        self.current = current


class Expired(Conflict):
    """A decision found its request past the deadline and expired it (that is
    committed); ``current`` is the expired request."""


class Forbidden(Exception):
    """Allowed to ask, but not this (HTTP 403)."""


class Invalid(ValueError):
    """Input that passed the schema but not the rules (HTTP 400)."""


_json_decode = msgspec.json.Decoder().decode


def json_value(text: str) -> Any:
    """A jsonb value as Python: by msgspec (a list of fifty rows decodes fifty
    of them), else by the standard library, which also takes what msgspec
    does not (a number past a double's range, such as 1e400, is inf)."""
    try:
        return _json_decode(text)
    except msgspec.DecodeError:
        return json.loads(text)


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb in and out as Python objects."""
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: msgspec.json.encode(v).decode(),
        decoder=json_value,
        schema="pg_catalog",
    )


async def page(
    conn: asyncpg.Connection,
    spec: ListSpec,
    lq: ListQuery,
    make: Callable[[asyncpg.Record], Any],
    count: str | None,
) -> Page[Any]:
    sql, args = select_sql(spec, lq)
    rows = await conn.fetch(sql, *args)
    more = len(rows) > lq.limit
    rows = rows[: lq.limit]
    next_cursor = None
    if more and rows:
        column = spec.orders[lq.order.lstrip("-")][0]
        next_cursor = encode_cursor(lq.order, rows[-1][column], rows[-1]["id"])
    total = None
    if count in ("exact", "estimated"):
        csql, cargs = count_sql(spec, lq, estimated=count == "estimated")
        value = await conn.fetchval(csql, *cargs)
        total = int(value) if count == "exact" else int(json.loads(value)[0]["Plan"]["Plan Rows"])
    return Page(items=[make(r) for r in rows], next_cursor=next_cursor, count=total)


class JsonPage(msgspec.Struct, frozen=True, rename="camel"):
    """A page whose items PostgreSQL wrote as JSON: sent as they are."""

    items: msgspec.Raw
    next_cursor: str | None
    count: int | None = None


def _is_datetime(tp: Any) -> bool:
    return tp is datetime or (isinstance(tp, types.UnionType) and datetime in tp.__args__)


@functools.cache
def _json_object(struct_type: type) -> str:
    """SQL building the wire form of ``struct_type`` (camelCase keys, RFC 3339
    UTC times) from columns named as its fields."""
    parts = []
    for f in msgspec.structs.fields(struct_type):
        expr = f.name
        if _is_datetime(f.type):
            expr = f"""to_char({f.name} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
        parts.append(f"'{f.encode_name}', {expr}")
    return "json_build_object(" + ", ".join(parts) + ")"


async def json_page(
    conn: asyncpg.Connection,
    spec: ListSpec,
    lq: ListQuery,
    struct_type: type,
    count: str | None,
) -> JsonPage:
    """The same page as ``page``, its items built as JSON by PostgreSQL in one
    round trip: a list of fifty rows costs no Python object per row."""
    sql, args = select_sql(spec, lq)
    column = spec.orders[lq.order.lstrip("-")][0]
    direction = "DESC" if lq.order.startswith("-") else "ASC"
    limit = int(lq.limit)
    row = await conn.fetchrow(
        f"WITH page AS ({sql}), "
        f"ranked AS (SELECT page.*, row_number() OVER (ORDER BY {column} {direction}, id {direction}) AS n "
        f"FROM page) "
        f"SELECT coalesce((SELECT json_agg(obj ORDER BY n) FROM "
        f"(SELECT {_json_object(struct_type)} AS obj, n FROM ranked WHERE n <= {limit}) x), '[]'::json)::text "
        f"AS items, (SELECT count(*) FROM ranked) AS fetched, "
        f"(SELECT {column} FROM ranked WHERE n = {limit}) AS last_value, "
        f"(SELECT id FROM ranked WHERE n = {limit}) AS last_id",
        *args,
    )
    next_cursor = None
    if row["fetched"] > limit:
        next_cursor = encode_cursor(lq.order, row["last_value"], row["last_id"])
    total = None
    if count in ("exact", "estimated"):
        csql, cargs = count_sql(spec, lq, estimated=count == "estimated")
        value = await conn.fetchval(csql, *cargs)
        total = int(value) if count == "exact" else int(json.loads(value)[0]["Plan"]["Plan Rows"])
    # PostgreSQL writes `{"id" : 1, …}`: made compact like every other answer,
    # without a Python object per row.
    items = msgspec.json.format(row["items"].encode(), indent=-1)
    return JsonPage(items=msgspec.Raw(items), next_cursor=next_cursor, count=total)
