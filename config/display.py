"""The configuration as it is shown (`jarvisd check-config`): secrets
hidden, rendered as TOML."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from config.settings import SECRET_KEYS, Settings
from config.webhooks import secret_free

__all__ = ["redact_url", "redacted", "to_toml"]


def redact_url(url: str) -> str:
    """Hide the password of a URL-style DSN; keep user, host and database visible."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data, secrets redacted, for display."""
    data: dict[str, Any] = msgspec.to_builtins(settings)
    for section, key in SECRET_KEYS:
        value = data[section].get(key)
        if value:
            data[section][key] = redact_url(value)
    data["webhooks"] = secret_free(settings.webhooks)
    return data


def to_toml(data: Mapping[str, Any]) -> str:
    """Render two-level plain data as TOML (enough for the effective config)."""
    lines: list[str] = []
    for section, table in data.items():
        if isinstance(table, list | tuple):  # an array of tables
            for entry in table:
                lines.append(f"[[{section}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in entry.items() if v is not None)
                lines.append("")
            continue
        lines.append(f"[{section}]")
        for key, value in table.items():
            if value is None:
                lines.append(f"# {key} is not set")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    return msgspec.json.encode(str(value)).decode()
