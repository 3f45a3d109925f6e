"""The configuration ``jarvisd init`` writes, which is also the checkout's own
``jarvisd.toml``: embedded PostgreSQL and Valkey beside the file."""

from __future__ import annotations

__all__ = ["default_toml"]


def default_toml(state_dir: str = "var", port: int = 8017) -> str:
    return f"""\
# jarvisd's default configuration: embedded PostgreSQL and Valkey, so
# `jarvisd run` works on a fresh machine with nothing else installed.
# Relative paths resolve against this file's folder: a copy of this file in
# another folder runs a separate, independent instance (set the port with
# JARVISD_HTTP__PORT). Every key is documented in config/examples/full.toml.

[daemon]
state_dir = "{state_dir}"
log_level = "info"
log_format = "auto"
shutdown_timeout = 20

[http]
host = "127.0.0.1"
port = {port}
unix_socket = "{state_dir.rstrip("/")}/jarvisd.sock"

[embedded]
enabled = true
"""
