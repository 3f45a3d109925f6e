"""List queries: filters, keyset cursors, capped offsets, counts (DESIGN §8).

Only names from a ListSpec reach SQL: filter columns and sort columns come
from the spec, never from the request, and every value is a bind parameter.
A cursor is opaque to clients (base64url JSON of the order and the last
row's sort key) and is refused if it does not match the requested order.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import msgspec

__all__ = [
    "ID_BOUNDS",
    "MAX_LIMIT",
    "MAX_OFFSET",
    "MAX_OFFSET_PARAM",
    "MAX_PAGE",
    "MAX_TEXT",
    "Filter",
    "ListError",
    "ListQuery",
    "ListSpec",
    "parse_integer",
    "parse_list",
]

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
# offset (≤ 5,000) and page (≤ 26, of ``limit`` rows) add up: at most 10,000
# rows deep whatever the combination. Past that, the cursor walks on.
MAX_OFFSET_PARAM = 5_000
MAX_PAGE = 26
MAX_OFFSET = MAX_OFFSET_PARAM + (MAX_PAGE - 1) * MAX_LIMIT
MAX_TEXT = 200
ID_BOUNDS = (1, 2**63 - 1)
COMMON = frozenset({"limit", "cursor", "offset", "page", "order"})
Kind = Literal["eq", "in", "min", "max", "fts", "bool", "like"]


class ListError(ValueError):
    """A list request the API refuses (HTTP 400); the message says why."""


@dataclass(frozen=True, slots=True)
class Filter:
    column: str  # trusted SQL expression from the spec
    kind: Kind
    type: type = str
    choices: frozenset[str] | None = None
    bounds: tuple[int, int] | None = None  # inclusive, for int filters


@dataclass(frozen=True, slots=True)
class ListSpec:
    table: str
    columns: str
    filters: Mapping[str, Filter]
    orders: Mapping[str, tuple[str, type]]  # name -> (column, type of its values)
    default_order: str = "-createdAt"

    @property
    def params(self) -> frozenset[str]:
        return COMMON | frozenset(self.filters)


@dataclass
class ListQuery:
    where: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)
    order: str = "-createdAt"
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    after: tuple[Any, int] | None = None

    def bind(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"


def _one(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ListError(f"give {name} once (use a comma list for several values)")
    return values[0]


def _convert(name: str, raw: str, typ: type) -> Any:
    if "\x00" in raw:
        raise ListError(f"{name} must not contain NUL characters")
    try:
        if typ is int:
            value = parse_integer(raw)
            if value is None or not -(2**63) <= value < 2**63:
                raise ValueError
            return value
        if typ is bool:
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return raw.lower() == "true"
        if typ is datetime:
            return parse_timestamp(name, raw)
    except ValueError as exc:
        if isinstance(exc, ListError):
            raise
        raise ListError(f"{name}: {raw!r} is not a valid {typ.__name__}") from None
    if len(raw) > MAX_TEXT:
        raise ListError(f"{name} is longer than {MAX_TEXT} characters")
    return raw


_INTEGER = re.compile(r"^-?[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]{1,2})?$")


def parse_integer(raw: str) -> int | None:
    """A JSON Schema integer written as text: digits, or any number with a
    zero fraction ("7", "7.0", "7e2"); None for anything else."""
    if len(raw) > 100 or not _INTEGER.match(raw):
        return None
    if raw.lstrip("-").isdigit():
        return int(raw)
    number = Decimal(raw)
    if number != number.to_integral_value():
        return None
    return int(number)


_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_timestamp(name: str, raw: str) -> datetime:
    """An RFC 3339 date-time (what the API documents): a timezone is required.
    A leap second reads as the last microsecond before it; an instant outside
    what Python represents is the nearest representable one (the filters it
    feeds compare, so the answer is the same)."""
    m = _RFC3339.match(raw)
    if m is None:
        if _RFC3339.match(raw + "Z"):
            raise ListError(f"{name} needs a timezone, e.g. 2026-11-28T15:00:00Z")
        raise ListError(f"{name}: {raw!r} is not an RFC 3339 date-time")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction = (m.group(7) or ".0")[1:7].ljust(6, "0")
    zone = m.group(8)
    offset = timedelta(0)
    if zone not in ("Z", "z"):
        sign = -1 if zone[0] == "-" else 1
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            raise ListError(f"{name}: {raw!r} has an invalid UTC offset")
        offset = sign * timedelta(hours=hours, minutes=minutes)
    micro = int(fraction)
    if second == 60:  # a leap second
        second, micro = 59, 999_999
    try:
        local = datetime(year, month, day, hour, minute, second, micro)
    except ValueError:
        raise ListError(f"{name}: {raw!r} is not a valid date-time") from None
    try:
        return (local - offset).replace(tzinfo=UTC)
    except OverflowError:
        return (datetime.min if offset > timedelta(0) else datetime.max).replace(tzinfo=UTC)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def parse_list(
    spec: ListSpec, query: Mapping[str, list[str]], *, forced: Mapping[str, Any] | None = None
) -> ListQuery:
    """Validate the request's list parameters against ``spec``.

    ``forced`` adds equality conditions the caller may not override (a user
    sees only their own rows)."""
    unknown = sorted(set(query) - spec.params)
    if unknown:
        raise ListError(
            f"unknown query parameter(s): {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(spec.params))})"
        )
    lq = ListQuery(order=_one(query, "order") or spec.default_order)
    if lq.order.lstrip("-") not in spec.orders:
        raise ListError(
            f"order must be one of {', '.join(sorted(spec.orders))}, optionally prefixed with -"
        )
    limit = _one(query, "limit")
    if limit is not None:
        lq.limit = _convert("limit", limit, int)
        if not 1 <= lq.limit <= MAX_LIMIT:
            raise ListError(f"limit must be between 1 and {MAX_LIMIT}")
    for name, flt in spec.filters.items():
        raw = _one(query, name)
        if raw is None:
            continue
        if flt.kind == "in":
            values = [v.strip() for v in raw.split(",") if v.strip()]
            if not values or len(values) > 50:
                raise ListError(f"{name}: give 1 to 50 comma-separated values")
            if flt.choices is not None:
                bad = sorted(set(values) - flt.choices)
                if bad:
                    raise ListError(
                        f"{name}: unknown value(s) {', '.join(bad)} "
                        f"(expected: {', '.join(sorted(flt.choices))})"
                    )
            converted = [_convert(name, v, flt.type) for v in values]
            lq.where.append(f"{flt.column} = ANY({lq.bind(converted)})")
        elif flt.kind == "fts":
            lq.where.append(
                f"{flt.column} @@ websearch_to_tsquery('simple', {lq.bind(_convert(name, raw, str))})"
            )
        elif flt.kind == "like":
            pattern = f"%{_escape_like(_convert(name, raw, str))}%"
            lq.where.append(f"({flt.column}) ILIKE {lq.bind(pattern)}")
        else:
            value = _convert(name, raw, flt.type)
            if flt.bounds is not None and not flt.bounds[0] <= value <= flt.bounds[1]:
                raise ListError(f"{name} must be between {flt.bounds[0]} and {flt.bounds[1]}")
            op = {"eq": "=", "bool": "=", "min": ">=", "max": "<="}[flt.kind]
            lq.where.append(f"{flt.column} {op} {lq.bind(value)}")
    for column, value in (forced or {}).items():
        lq.where.append(f"{column} = {lq.bind(value)}")
    # Each of these narrows the same walk: rows after the cursor, skipping
    # ``offset`` rows and then ``page - 1`` pages.
    cursor, offset, page = _one(query, "cursor"), _one(query, "offset"), _one(query, "page")
    if cursor:  # an empty cursor is the first page
        lq.after = decode_cursor(cursor, lq.order, spec.orders[lq.order.lstrip("-")][1])
    if offset is not None:
        lq.offset = _convert("offset", offset, int)
        if not 0 <= lq.offset <= MAX_OFFSET_PARAM:
            raise ListError(
                f"offset must be between 0 and {MAX_OFFSET_PARAM}; use the cursor (nextCursor) beyond"
            )
    if page is not None:
        number = _convert("page", page, int)
        if not 1 <= number <= MAX_PAGE:
            raise ListError(
                f"page must be between 1 and {MAX_PAGE}; use the cursor (nextCursor) beyond"
            )
        lq.offset += (number - 1) * lq.limit
    return lq


def select_sql(spec: ListSpec, lq: ListQuery) -> tuple[str, list[Any]]:
    """The page query (one row more than the limit, to know if there is a next page)."""
    column, _typ = spec.orders[lq.order.lstrip("-")]
    desc = lq.order.startswith("-")
    args = list(lq.args)
    where = list(lq.where)
    if lq.after is not None:
        args += [lq.after[0], lq.after[1]]
        where.append(f"({column}, id) {'<' if desc else '>'} (${len(args) - 1}, ${len(args)})")
    direction = "DESC" if desc else "ASC"
    sql = f"SELECT {spec.columns} FROM {spec.table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {column} {direction}, id {direction} LIMIT {lq.limit + 1}"
    if lq.offset:
        sql += f" OFFSET {lq.offset}"
    return sql, args


def count_sql(spec: ListSpec, lq: ListQuery, *, estimated: bool) -> tuple[str, list[Any]]:
    where = (" WHERE " + " AND ".join(lq.where)) if lq.where else ""
    if estimated:
        return f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {spec.table}{where}", list(lq.args)
    return f"SELECT count(*) FROM {spec.table}{where}", list(lq.args)


def encode_cursor(order: str, value: Any, row_id: int) -> str:
    if isinstance(value, datetime):
        value = value.isoformat()
    raw = msgspec.json.encode([order, value, row_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, order: str, typ: type) -> tuple[Any, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        got_order, value, row_id = msgspec.json.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError, TypeError):
        raise ListError("invalid cursor") from None
    if got_order != order:
        raise ListError("the cursor belongs to another order; start again without it")
    if not isinstance(row_id, int) or isinstance(row_id, bool):
        raise ListError("invalid cursor")
    if typ is datetime:
        if not isinstance(value, str):
            raise ListError("invalid cursor")
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ListError("invalid cursor") from None
    elif (typ is int and (not isinstance(value, int) or isinstance(value, bool))) or (
        typ is str and not isinstance(value, str)
    ):
        raise ListError("invalid cursor")
    return value, row_id
