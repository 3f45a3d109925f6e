"""Embedded servers: PostgreSQL and Valkey as supervised child actors (DESIGN §10)."""

from actors.embedded.binaries import find_postgres_bin_dir, find_valkey_server
from actors.embedded.child import (
    EMBEDDED_ACCOUNT,
    ChildExited,
    ChildServer,
    RunAs,
    ensure_account,
    runtime_dir,
    secret,
)
from actors.embedded.postgres import EmbeddedPostgres, dsn_for
from actors.embedded.valkey import EmbeddedValkey

__all__ = [
    "EMBEDDED_ACCOUNT",
    "ChildExited",
    "ChildServer",
    "EmbeddedPostgres",
    "EmbeddedValkey",
    "RunAs",
    "dsn_for",
    "ensure_account",
    "find_postgres_bin_dir",
    "find_valkey_server",
    "runtime_dir",
    "secret",
]
