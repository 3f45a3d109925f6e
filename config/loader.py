"""Load settings from TOML, the environment and credential files.

Order, later wins: defaults < the TOML file < ``JARVISD_<SECTION>__<KEY>`` variables.
Secrets then come from ``*_file`` keys or ``$CREDENTIALS_DIRECTORY`` (systemd's
LoadCredential=), so they never need to sit in the file or in ``Environment=``.

Every problem is collected before reporting, so one run of ``check-config``
shows them all, each with its source (file or variable), key path and what
was expected.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from config.explain import allowed_values, explain, split_path
from config.settings import PATH_KEYS, SECRET_KEYS, Settings
from config.webhooks import load_webhooks

ENV_PREFIX = "JARVISD_"
DEFAULT_SYSTEM_CONFIG = Path("/etc/jarvisd/jarvisd.toml")
# Credential names looked up in $CREDENTIALS_DIRECTORY for each secret key.
CREDENTIAL_NAMES: Mapping[tuple[str, str], str] = {
    ("postgres", "dsn"): "postgres.dsn",
    ("redis", "url"): "redis.url",
}


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    source: str
    key: str
    message: str

    def __str__(self) -> str:
        return (
            f"{self.source}: {self.key}: {self.message}"
            if self.key
            else f"{self.source}: {self.message}"
        )


class ConfigError(Exception):
    """The configuration is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    settings: Settings
    path: Path | None


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$JARVISD_CONFIG``, else ``./jarvisd.toml`` if present, else the system path."""
    env = os.environ if env is None else env
    if env.get("JARVISD_CONFIG"):
        return Path(env["JARVISD_CONFIG"])
    local = Path("jarvisd.toml")
    return local if local.is_file() else DEFAULT_SYSTEM_CONFIG


def _field_types(cls: type[msgspec.Struct]) -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(cls)}


SECTION_TYPES: dict[str, Any] = _field_types(Settings)


def _check_value(
    section: str, key: str, value: Any, source: str, issues: list[ConfigIssue], *, from_env: bool
) -> Any:
    ftype = _field_types(SECTION_TYPES[section])[key]
    if from_env and isinstance(value, str) and value == "" and _optional(ftype):
        return None
    if from_env and isinstance(value, str) and _is_list(ftype):
        # A list in a variable is written as JSON: JARVISD_PUBSUB__CHANNELS='["a", "b*"]'.
        try:
            value = msgspec.json.decode(value)
        except msgspec.DecodeError as exc:
            issues.append(ConfigIssue(source, f"{section}.{key}", f"invalid JSON list: {exc}"))
            return msgspec.UNSET
    try:
        return msgspec.convert(value, ftype, strict=not from_env)
    except msgspec.ValidationError as exc:
        problem, inside = split_path(exc)
        issues.append(
            ConfigIssue(source, f"{section}.{key}{inside}", explain(problem, allowed_values(ftype)))
        )
        return msgspec.UNSET


def _is_list(ftype: Any) -> bool:
    return getattr(ftype, "__origin__", None) is list or ftype is list


def _optional(ftype: Any) -> bool:
    return type(None) in getattr(ftype, "__args__", ())


def _read_toml(path: Path, issues: list[ConfigIssue]) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        issues.append(ConfigIssue(str(path), "", "file not found"))
    except PermissionError:
        issues.append(ConfigIssue(str(path), "", "permission denied"))
    except IsADirectoryError:
        issues.append(ConfigIssue(str(path), "", "is a directory, expected a TOML file"))
    except tomllib.TOMLDecodeError as exc:
        issues.append(ConfigIssue(str(path), "", f"invalid TOML: {exc}"))
    return {}


def _merge_file(
    raw: dict[str, Any], source: str, out: dict[str, dict[str, Any]], issues: list[ConfigIssue]
) -> None:
    for section, table in raw.items():
        if section not in SECTION_TYPES:
            known = ", ".join(sorted(SECTION_TYPES))
            issues.append(
                ConfigIssue(source, section, f"unknown section (expected one of: {known})")
            )
            continue
        if not isinstance(table, dict):
            issues.append(
                ConfigIssue(source, section, f"expected a table [{section}], got a value")
            )
            continue
        fields = _field_types(SECTION_TYPES[section])
        for key, value in table.items():
            if key not in fields:
                known = ", ".join(sorted(fields))
                issues.append(
                    ConfigIssue(
                        source, f"{section}.{key}", f"unknown key (expected one of: {known})"
                    )
                )
                continue
            checked = _check_value(section, key, value, source, issues, from_env=False)
            if checked is not msgspec.UNSET:
                out.setdefault(section, {})[key] = checked


def _merge_env(
    env: Mapping[str, str], out: dict[str, dict[str, Any]], issues: list[ConfigIssue]
) -> None:
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        source = f"environment {name}"
        if section not in SECTION_TYPES:
            issues.append(ConfigIssue(source, f"{section}.{key}", "unknown section"))
            continue
        if section == "webhooks":
            issues.append(ConfigIssue(source, section, "webhooks are set in the config file only"))
            continue
        if key not in _field_types(SECTION_TYPES[section]):
            issues.append(ConfigIssue(source, f"{section}.{key}", "unknown key"))
            continue
        checked = _check_value(section, key, value, source, issues, from_env=True)
        if checked is not msgspec.UNSET:
            out.setdefault(section, {})[key] = checked


def _resolve_paths(merged: dict[str, dict[str, Any]], base: Path) -> None:
    for section, key in PATH_KEYS:
        value = merged.get(section, {}).get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            merged[section][key] = str((base / value).resolve())


def _read_secret(path: Path, source: str, key: str, issues: list[ConfigIssue]) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        issues.append(ConfigIssue(source, key, f"cannot read {path}: {exc.strerror or exc}"))
        return None
    except UnicodeDecodeError:
        issues.append(ConfigIssue(source, key, f"{path} is not UTF-8 text"))
        return None
    if not text:
        issues.append(ConfigIssue(source, key, f"{path} is empty"))
        return None
    return text


def _load_secrets(
    merged: dict[str, dict[str, Any]],
    env: Mapping[str, str],
    source: str,
    issues: list[ConfigIssue],
) -> None:
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    for section, key in sorted(SECRET_KEYS):
        table = merged.setdefault(section, {})
        file_key = f"{key}_file"
        if table.get(key) and table.get(file_key):
            issues.append(
                ConfigIssue(source, f"{section}.{key}", f"set either {key} or {file_key}, not both")
            )
            continue
        if table.get(file_key):
            secret = _read_secret(Path(table[file_key]), source, f"{section}.{file_key}", issues)
            if secret is not None:
                table[key] = secret
        elif not table.get(key) and cred_dir:
            cred = Path(cred_dir) / CREDENTIAL_NAMES[(section, key)]
            # An empty credential means "not provided": the unit's SetCredential=
            # default when no LoadCredential= file exists (embedded mode).
            if cred.exists() and cred.stat().st_size > 0:
                secret = _read_secret(cred, "credentials", f"{section}.{key}", issues)
                if secret is not None:
                    table[key] = secret


def _cross_checks(settings: Settings, source: str, issues: list[ConfigIssue]) -> None:
    pg = settings.postgres
    if pg.pool_min > pg.pool_max:
        issues.append(
            ConfigIssue(
                source,
                "postgres.pool_min",
                f"must be <= postgres.pool_max ({pg.pool_max}), got {pg.pool_min}",
            )
        )
    if not settings.embedded.enabled:
        if not pg.dsn:
            issues.append(
                ConfigIssue(source, "postgres.dsn", "required when embedded.enabled = false")
            )
        if not settings.redis.url:
            issues.append(
                ConfigIssue(source, "redis.url", "required when embedded.enabled = false")
            )
    if pg.dsn and urlsplit(pg.dsn).scheme not in ("postgres", "postgresql"):
        issues.append(ConfigIssue(source, "postgres.dsn", "expected a postgresql:// URL"))
    _check_redis(settings, source, issues)
    if settings.sessions.idle_ttl > settings.sessions.absolute_ttl:
        issues.append(ConfigIssue(source, "sessions.idle_ttl", "must be <= sessions.absolute_ttl"))
    if settings.supervisor.backoff_initial > settings.supervisor.backoff_max:
        issues.append(
            ConfigIssue(source, "supervisor.backoff_initial", "must be <= supervisor.backoff_max")
        )
    _check_channels(settings, source, issues)


_GLOB = re.compile(r"[*?\[\]\\]")


def _check_channels(settings: Settings, source: str, issues: list[ConfigIssue]) -> None:
    """A pass-through channel (or glob) may never reach the daemon's own
    channels or an inbox: it goes into every agent's Redis ACL as it is."""
    owned = (settings.redis.prefix, settings.inbox)
    for i, name in enumerate(settings.pubsub.channels):
        glob = _GLOB.search(name)
        head = name[: glob.start()] if glob else name
        reaches = any(
            head.startswith(own) or (glob is not None and own.startswith(head)) for own in owned
        )
        if reaches or (glob is not None and not head):
            issues.append(
                ConfigIssue(
                    source,
                    f"pubsub.channels[{i}]",
                    f"{name!r} could match the daemon's own channels or an agent's inbox "
                    f"({settings.redis.prefix}…, {settings.inbox}…); name channels outside them, "
                    "with a literal start before any glob character",
                )
            )


def _check_redis(settings: Settings, source: str, issues: list[ConfigIssue]) -> None:
    r = settings.redis
    scheme = urlsplit(r.url).scheme if r.url else ""
    if r.url and scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
        issues.append(
            ConfigIssue(
                source,
                "redis.url",
                "expected a redis://, rediss://, unix://, redis+cluster:// or rediss+cluster:// URL",
            )
        )
    cluster = r.cluster or scheme.endswith("+cluster")
    if cluster and scheme == "unix":
        issues.append(
            ConfigIssue(source, "redis.url", "a Redis Cluster is reached over TCP, not unix://")
        )
    if cluster and settings.embedded_redis:
        issues.append(
            ConfigIssue(
                source, "redis.cluster", "needs redis.url: the embedded Valkey is no cluster"
            )
        )
    if cluster and r.replica_wait >= r.connect_timeout:
        issues.append(
            ConfigIssue(
                source,
                "redis.replica_wait",
                f"must be < redis.connect_timeout ({r.connect_timeout:g}), the socket timeout",
            )
        )
    if "{" in r.prefix or "}" in r.prefix:
        # A hash tag in the prefix would put every key in one cluster slot.
        issues.append(ConfigIssue(source, "redis.prefix", "must not contain { or }"))


def load_settings(
    path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Load and validate the configuration; raise ConfigError listing every problem.

    ``path=None`` means :func:`default_config_path`. A missing default
    system file is not an error when the environment supplies everything.
    """
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get("JARVISD_CONFIG"))
    cfg_path = Path(path) if path is not None else default_config_path(env)
    issues: list[ConfigIssue] = []
    merged: dict[str, Any] = {}
    hooks: Any = None  # [[webhooks]]: checked with their secrets (config/webhooks.py)

    used_path: Path | None = cfg_path.resolve()
    if explicit or cfg_path.exists():
        raw = _read_toml(cfg_path, issues)
        hooks = raw.pop("webhooks", None)
        _merge_file(raw, str(cfg_path), merged, issues)
        base = cfg_path.resolve().parent
    else:
        used_path, base = None, Path.cwd()
    _merge_env(env, merged, issues)
    _resolve_paths(merged, base)
    source = str(cfg_path) if used_path else "configuration"
    _load_secrets(merged, env, source, issues)
    if hooks is not None:
        checked = load_webhooks(
            hooks, base, env, lambda key, problem: issues.append(ConfigIssue(source, key, problem))
        )
        merged["webhooks"] = msgspec.to_builtins(checked)
    if issues:
        raise ConfigError(issues)
    try:
        settings = msgspec.convert(merged, Settings)
    except msgspec.ValidationError as exc:  # pragma: no cover - per-key checks come first
        raise ConfigError([ConfigIssue(source, "", str(exc))]) from exc
    _cross_checks(settings, source, issues)
    if issues:
        raise ConfigError(issues)
    return LoadedConfig(settings=settings, path=used_path)
