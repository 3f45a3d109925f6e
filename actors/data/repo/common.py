"""What every repository module shares: the errors the API maps to statuses,
the connection set-up, and one page of a list query."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec

from actors.data.listing import ListQuery, ListSpec, count_sql, encode_cursor, select_sql
from actors.data.model import Page

__all__ = ["Conflict", "Expired", "Forbidden", "Invalid", "NotFound", "init_connection", "page"]


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


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb in and out as Python objects."""
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: msgspec.json.encode(v).decode(),
        decoder=json.loads,
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
