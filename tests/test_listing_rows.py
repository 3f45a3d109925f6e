"""The command list reads rows by position and jsonb by msgspec: both are
shown here against a real database, including what msgspec alone would
refuse (a number past a double's range, which jsonb stores)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest

from actors import migrate
from actors.data import model, repo
from actors.data.listing import parse_list
from actors.data.repo.commands import COMMAND_COLUMNS, COMMANDS
from actors.data.repo.common import json_value


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(pg_dsn)
    await migrate.migrate(c)
    await repo.init_connection(c)
    try:
        yield c
    finally:
        await c.close()


async def test_the_listed_columns_are_the_commands_fields_in_order(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(
        "INSERT INTO commands (request_id, source, type, action, parameters, description, "
        "status, risk_score, risk_category, sender) "
        "VALUES ('r1', 'api', 'api', 'turn_on', '{}', '', 'approved', 10, 'LOW', 'inbox')"
    )
    row = await conn.fetchrow(f"SELECT {COMMAND_COLUMNS} FROM commands")
    assert row is not None
    assert list(row.keys()) == [f.name for f in msgspec.structs.fields(model.Command)]


async def test_a_listed_page_is_the_commands_as_read_one_by_one(conn: asyncpg.Connection) -> None:
    for i in range(3):
        await conn.execute(
            "INSERT INTO commands (request_id, source, type, action, parameters, description, "
            "status, risk_score, risk_category, sender, result) "
            "VALUES ($1, 'api', 'api', 'turn_on', "
            """'{"room": "kitchen", "big": 1e400, "n": 12345678901234567890123, """
            """"past": 1e400}'::jsonb || jsonb_build_object('past', ('1e400'::numeric + 0.5)), """
            "'d', 'succeeded', 10, 'LOW', 'inbox', '[1, 2]')",
            f"r{i}",
        )
    page = await repo.list_commands(conn, parse_list(COMMANDS, {"limit": ["2"]}), None)
    assert isinstance(page, model.Page)
    assert len(page.items) == 2
    assert page.next_cursor is not None
    for listed in page.items:
        assert listed == await repo.get_command(conn, listed.id)
        # jsonb writes 1e400 out in digits: a Python int.
        assert listed.parameters["big"] == 10**400
        assert listed.parameters["n"] == 12345678901234567890123
        # With a fraction, a double's range is passed: msgspec refuses, json reads inf.
        assert listed.parameters["past"] == float("inf")
        assert listed.result == [1, 2]


def test_json_values_msgspec_refuses_are_read_by_the_standard_library() -> None:
    assert json_value('{"a": [1, "x", null]}') == {"a": [1, "x", None]}
    assert json_value("1e400") == float("inf")
    with pytest.raises(ValueError, match="Expecting value"):
        json_value("not json")
