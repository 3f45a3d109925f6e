"""The migration runner: advisory lock, checksums, one transaction each (DESIGN §4)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from actors import migrate as migrations
from actors.migrate import Migration, MigrationError


def numbered(*sqls: str) -> list[Migration]:
    return [Migration(i + 1, f"step{i + 1}", sql) for i, sql in enumerate(sqls)]


async def test_shipped_migrations_apply_once_and_are_recorded_with_checksums(
    empty_pg_dsn: str,
) -> None:
    conn = await asyncpg.connect(empty_pg_dsn)
    try:
        first = await migrations.migrate(conn)
        again = await migrations.migrate(conn)
        rows = await conn.fetch(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
        )
        database_id = await conn.fetchval(
            "SELECT value FROM jarvisd_info WHERE key = 'database_id'"
        )
    finally:
        await conn.close()
    shipped = migrations.discover()
    assert first == [f"{m.version:04d}_{m.name}" for m in shipped]
    assert again == []
    assert [(r["version"], r["checksum"]) for r in rows] == [
        (m.version, m.checksum) for m in shipped
    ]
    assert len(database_id) == 36


async def test_concurrent_runs_apply_each_migration_exactly_once(empty_pg_dsn: str) -> None:
    steps = numbered("CREATE TABLE t1 (id int)", "SELECT pg_sleep(0.2); CREATE TABLE t2 (id int)")
    conns = [await asyncpg.connect(empty_pg_dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrations.migrate(c, steps) for c in conns))
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
    finally:
        for c in conns:
            await c.close()
    applied = [name for r in results for name in r]
    assert sorted(applied) == ["0001_step1", "0002_step2"]
    assert count == 2


async def test_a_migration_changed_after_it_was_applied_is_an_error(empty_pg_dsn: str) -> None:
    conn = await asyncpg.connect(empty_pg_dsn)
    try:
        await migrations.migrate(conn, numbered("CREATE TABLE t1 (id int)"))
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrations.migrate(conn, numbered("CREATE TABLE t1 (id bigint)"))
    finally:
        await conn.close()


async def test_an_applied_migration_unknown_to_this_version_is_an_error(empty_pg_dsn: str) -> None:
    conn = await asyncpg.connect(empty_pg_dsn)
    try:
        await migrations.migrate(
            conn, numbered("CREATE TABLE t1 (id int)", "CREATE TABLE t2 (id int)")
        )
        with pytest.raises(MigrationError, match="unknown to this jarvisd"):
            await migrations.migrate(conn, numbered("CREATE TABLE t1 (id int)"))
    finally:
        await conn.close()


async def test_a_failing_migration_rolls_back_and_records_nothing(empty_pg_dsn: str) -> None:
    conn = await asyncpg.connect(empty_pg_dsn)
    steps = numbered(
        "CREATE TABLE ok1 (id int)", "CREATE TABLE half (id int); SELECT no_such_function()"
    )
    try:
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await migrations.migrate(conn, steps)
        recorded = await conn.fetchval("SELECT array_agg(version) FROM schema_migrations")
        half = await conn.fetchval("SELECT to_regclass('half')")
        # The lock was released: another run can proceed.
        status = await migrations.status(conn, steps)
    finally:
        await conn.close()
    assert recorded == [1]
    assert half is None
    assert status == {"applied": ["0001_step1"], "pending": ["0002_step2"]}


def test_migration_files_must_be_numbered(tmp_path: Path) -> None:
    (tmp_path / "create_things.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        migrations.discover(tmp_path)


def test_duplicate_numbers_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1")
    (tmp_path / "0001_b.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="duplicate"):
        migrations.discover(tmp_path)
