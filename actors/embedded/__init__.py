"""Embedded servers: PostgreSQL and Valkey as supervised child actors (DESIGN §10)."""

from actors.embedded.account import EMBEDDED_ACCOUNT, RunAs, ensure_account
from actors.embedded.binaries import find_postgres_bin_dir, find_valkey_server
from actors.embedded.child import ChildExited, ChildServer, secret
from actors.embedded.homes import forget, remove_gone_homes, runtime_dir
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
    "forget",
    "remove_gone_homes",
    "runtime_dir",
    "secret",
]
