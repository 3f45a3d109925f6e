"""The migration runner (DESIGN §4).

Migrations are numbered SQL files shipped in ``actors/migrations``
(``0001_name.sql``). Each is applied in its own transaction under a Postgres
advisory lock, so several daemons starting at once apply it exactly once, and
recorded with a SHA-256 checksum: a migration edited after it was applied, or
an applied one this version does not know, stops the run with a clear error.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["Migration", "MigrationError", "discover", "migrate", "status"]

# pg_advisory_lock key: a stable 63-bit number derived from the name.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"jarvisd.migrations").digest()[:8], "big") >> 1
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    """Migrations cannot be applied safely."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path | None = None) -> list[Migration]:
    """The migrations in ``directory`` (default: those shipped in the package), in order."""
    found: list[Migration] = []
    if directory is None:
        entries = [
            (e.name, e.read_text(encoding="utf-8"))
            for e in resources.files("actors.migrations").iterdir()
            if e.name.endswith(".sql")
        ]
    else:
        entries = [(p.name, p.read_text(encoding="utf-8")) for p in directory.glob("*.sql")]
    for filename, sql in entries:
        m = _NAME.match(filename)
        if m is None:
            raise MigrationError(f"migration file {filename!r} is not named NNNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), sql))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration numbers in {versions}")
    return found


_CREATE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def _verify(conn: Any, migrations: list[Migration]) -> set[int]:
    known = {m.version: m for m in migrations}
    rows = await conn.fetch(
        "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
    )
    for row in rows:
        mig = known.get(row["version"])
        if mig is None:
            raise MigrationError(
                f"the database has migration {row['version']:04d}_{row['name']}, unknown to this jarvisd "
                "(was it written by a newer version?)"
            )
        if mig.checksum != row["checksum"]:
            raise MigrationError(
                f"migration {mig.version:04d}_{mig.name} changed after it was applied "
                f"(checksum {row['checksum'][:12]} in the database, {mig.checksum[:12]} in the file)"
            )
    return {row["version"] for row in rows}


async def migrate(conn: Any, migrations: list[Migration] | None = None) -> list[str]:
    """Apply pending migrations on ``conn`` (an asyncpg connection); return their names."""
    migrations = discover() if migrations is None else migrations
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(_CREATE)
        done = await _verify(conn, migrations)
        for mig in migrations:
            if mig.version in done:
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    mig.version,
                    mig.name,
                    mig.checksum,
                )
            applied_now.append(f"{mig.version:04d}_{mig.name}")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    return applied_now


async def status(conn: Any, migrations: list[Migration] | None = None) -> dict[str, list[str]]:
    """Applied and pending migration names (verifies checksums too)."""
    migrations = discover() if migrations is None else migrations
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = await _verify(conn, migrations) if exists else set()
    return {
        "applied": [f"{m.version:04d}_{m.name}" for m in migrations if m.version in done],
        "pending": [f"{m.version:04d}_{m.name}" for m in migrations if m.version not in done],
    }
