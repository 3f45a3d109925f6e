"""Embedded servers: PostgreSQL and Valkey as supervised child actors (DESIGN §10)."""

from actors.embedded.binaries import find_postgres_bin_dir, find_valkey_server
from actors.embedded.child import ChildExited, ChildServer, RunAs, runtime_dir
from actors.embedded.postgres import EmbeddedPostgres, dsn_for
from actors.embedded.valkey import EmbeddedValkey

__all__ = [
    "ChildExited",
    "ChildServer",
    "EmbeddedPostgres",
    "EmbeddedValkey",
    "RunAs",
    "dsn_for",
    "find_postgres_bin_dir",
    "find_valkey_server",
    "runtime_dir",
]
