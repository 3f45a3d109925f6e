"""SIGHUP reload: which settings change live and which need a restart.

A reload is all or nothing: an invalid file changes nothing. A valid one
applies the live keys and keeps the old value of every key that needs a
restart, reporting those by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from config import ConfigError, Settings

__all__ = ["RESTART_KEYS", "ReloadPlan", "plan_reload", "problems_of"]

# Keys bound at start: sockets, connections, child processes, log sinks.
# Everything else (log level, limits, timeouts, TTLs, policy) applies live.
RESTART_KEYS: frozenset[str] = frozenset(
    {
        "daemon.state_dir",
        "daemon.log_format",
        "http.host",
        "http.port",
        "http.unix_socket",
        "http.idle_timeout",
        "postgres.*",
        "redis.*",
        "embedded.*",
        "bus.stream",
        "bus.group",
        "bus.shared_inbox",  # which inboxes are read and who may write them
        "bus.manage_acls",
        "pubsub.channels",  # in every agent's Redis ACL
        "events.relay",  # whether this daemon's relay runs at all
    }
)


def _needs_restart(section: str, key: str) -> bool:
    return f"{section}.{key}" in RESTART_KEYS or f"{section}.*" in RESTART_KEYS


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    settings: Settings  # what to run on now
    applied: list[str]  # keys that changed and apply live
    restart_needed: list[str]  # keys that changed but keep their old value until a restart


def plan_reload(old: Settings, new: Settings) -> ReloadPlan:
    old_data: dict[str, Any] = msgspec.to_builtins(old)
    new_data: dict[str, Any] = msgspec.to_builtins(new)
    merged: dict[str, Any] = {}
    applied: list[str] = []
    restart: list[str] = []
    for section, values in new_data.items():
        if isinstance(values, list | tuple):  # [[webhooks]]: the whole array applies live
            merged[section] = values
            if values != old_data[section]:
                applied.append(section)
            continue
        merged[section] = {}
        for key, value in values.items():
            before = old_data[section].get(key)
            if value == before:
                merged[section][key] = value
            elif _needs_restart(section, key):
                merged[section][key] = before
                restart.append(f"{section}.{key}")
            else:
                merged[section][key] = value
                applied.append(f"{section}.{key}")
    return ReloadPlan(msgspec.convert(merged, Settings), applied, restart)


def problems_of(err: Exception) -> list[str]:
    """Why a reload was refused, a line each: every problem of an invalid
    file, or what else stopped it being read."""
    if isinstance(err, ConfigError):
        return [str(i) for i in err.issues]
    return [f"the config could not be read: {type(err).__name__}: {err}"]
