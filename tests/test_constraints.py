"""The wire types agree with the tables by construction: every CHECK
constraint of the schema is walked, and each input field that is stored in
the constrained column must refuse what PostgreSQL would refuse. A new
constraint fails this test until the fields that write its column are named
here; an envelope or a body the types accept is never refused by the database
(which would make its failure an error rather than a reason)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest

from actors import envelope as env
from actors.data import model

# Each constrained column, and every (Struct, field) whose value is stored in it.
# DERIVED: written only from values the daemon computes (statuses, categories).
DERIVED: tuple[tuple[type, str], ...] = ()
WRITERS: dict[tuple[str, str], tuple[tuple[type, str], ...]] = {
    ("users", "username"): ((model.UserCreate, "username"),),
    ("users", "email"): ((model.UserCreate, "email"), (model.UserUpdate, "email")),
    ("users", "role"): ((model.UserCreate, "role"), (model.UserUpdate, "role")),
    ("api_tokens", "name"): ((model.TokenCreate, "name"),),
    ("commands", "request_id"): (
        (model.CommandCreate, "request_id"),
        (env.CommandRequestedData, "request_id"),
        (env.CommandRequested, "id"),
    ),
    ("commands", "source"): ((model.CommandCreate, "source"), (env.CommandRequested, "source")),
    ("commands", "type"): ((model.CommandCreate, "type"), (env.CommandRequestedData, "type")),
    ("commands", "action"): ((model.CommandCreate, "action"), (env.CommandRequestedData, "action")),
    ("commands", "description"): (
        (model.CommandCreate, "description"),
        (env.CommandRequestedData, "description"),
    ),
    ("commands", "status"): ((model.CommandStatusUpdate, "status"),),
    ("commands", "risk_score"): (
        (model.CommandCreate, "risk_score"),
        (env.CommandRequestedData, "risk_score"),
    ),
    ("commands", "risk_category"): DERIVED,
    ("commands", "sender"): DERIVED,  # agent:<name>, user:<username> (<= 64) or inbox
    ("approval_requests", "action"): (
        (model.ApprovalCreate, "action"),
        (model.CommandCreate, "action"),
        (env.CommandRequestedData, "action"),
    ),
    ("approval_requests", "description"): (
        (model.ApprovalCreate, "description"),
        (model.CommandCreate, "description"),
        (env.CommandRequestedData, "description"),
    ),
    ("approval_requests", "risk_score"): ((model.ApprovalCreate, "risk_score"),),
    ("approval_requests", "risk_category"): DERIVED,
    ("approval_requests", "status"): DERIVED,
    ("approval_requests", "reason"): (
        (model.Decision, "reason"),
        (model.Rejection, "reason"),
        (model.CommandStatusUpdate, "reason"),
        (env.CommandCancelledData, "reason"),
    ),
    ("approval_requests", "decider"): DERIVED,  # a user name (<= 64) or uid:N
    ("approval_requests", "score_rule"): DERIVED,  # a rule's glob (<= 200) in words
    # The quorum of the request's category, from the configuration (Quorum: 1-10, 0-10).
    ("approval_requests", "approvals_required"): DERIVED,
    ("approval_requests", "admins_required"): DERIVED,
    ("approval_votes", "decider"): DERIVED,  # a user name (<= 64)
    ("approval_votes", "reason"): ((model.Decision, "reason"),),
    ("agents", "secret_hash"): DERIVED,  # the SHA-256 of a password the daemon makes
}


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()


def _field(struct: type, name: str) -> Any:
    info: Any = msgspec.inspect.type_info(struct)
    (found,) = [f for f in info.fields if f.name == name]
    kind = found.type
    while isinstance(kind, msgspec.inspect.UnionType | msgspec.inspect.Metadata):
        if isinstance(kind, msgspec.inspect.Metadata):
            kind = kind.type
            continue  # Optional: the constrained part
        kinds = [t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType)]
        assert len(kinds) == 1, (struct, name, kind)
        kind = kinds[0]
    return kind


def _check(column: str, definition: str, struct: type, name: str) -> None:
    kind = _field(struct, name)
    where = f"{struct.__name__}.{name} stored in {column} ({definition})"
    lengths = re.search(
        r"length\(\w+\) (?:<= (\d+)|>= (\d+) AND length\(\w+\) <= (\d+))", definition
    )
    if lengths:
        top = int(lengths.group(1) or lengths.group(3))
        low = int(lengths.group(2) or 0)
        assert isinstance(kind, msgspec.inspect.StrType), where
        assert (kind.max_length or top + 1) <= top, where
        assert (kind.min_length or 0) >= low, where
        assert kind.pattern is not None, where
        assert re.search(kind.pattern, "text\x00") is None, where  # NUL refused too
        return
    between = re.search(r">= (\d+)\) AND \(\w+ <= (\d+)", definition)
    if between:
        assert isinstance(kind, msgspec.inspect.IntType), where
        assert (kind.ge if kind.ge is not None else -1) >= int(between.group(1)), where
        assert (kind.le if kind.le is not None else 2**63) <= int(between.group(2)), where
        return
    choices = re.findall(r"'(\w+)'::text", definition)
    if "ANY" in definition and choices:
        assert isinstance(kind, msgspec.inspect.LiteralType), where
        assert set(kind.values) <= set(choices), where
        return
    pattern = re.search(r"~ '(.+)'::text", definition)
    if pattern:
        assert isinstance(kind, msgspec.inspect.StrType), where
        assert kind.pattern == pattern.group(1), where
        return
    raise AssertionError(f"a constraint this test cannot read: {column}: {definition}")


async def test_every_constrained_column_is_written_only_by_fields_that_refuse_what_it_refuses(
    db: asyncpg.Connection,
) -> None:
    rows = await db.fetch(
        "SELECT c.conrelid::regclass::text AS tbl, a.attname AS col, pg_get_constraintdef(c.oid) AS def "
        "FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid "
        "AND a.attnum = ANY(c.conkey) "
        "WHERE c.contype = 'c' AND c.connamespace = 'public'::regnamespace ORDER BY 1, 2"
    )
    seen = set()
    for row in rows:
        column = (row["tbl"], row["col"])
        assert column in WRITERS, f"name the fields that write {column}: {row['def']}"
        seen.add(column)
        for struct, name in WRITERS[column]:
            _check(f"{column[0]}.{column[1]}", row["def"], struct, name)
    assert seen == set(WRITERS), set(WRITERS) - seen


def test_json_that_postgresql_cannot_store_is_refused_when_an_envelope_is_parsed() -> None:
    raw = msgspec.json.encode(
        {
            "v": 1,
            "id": "x",
            "type": "command.completed",
            "data": {"requestId": "x", "result": {"k\u0000": 1}},
        }
    )
    refused = env.parse(raw, 65_536)
    assert isinstance(refused, env.Malformed)
    assert "NUL" in refused.reason
    assert "(a key)" in refused.reason
