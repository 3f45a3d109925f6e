"""jarvisd configuration: typed settings and their loader."""

from config.loader import (
    ConfigError,
    ConfigIssue,
    LoadedConfig,
    default_config_path,
    load_settings,
    redact_url,
    redacted,
    to_toml,
)
from config.settings import (
    ApprovalSettings,
    AuthSettings,
    BusSettings,
    CacheSettings,
    DaemonSettings,
    EmbeddedSettings,
    HttpSettings,
    PostgresSettings,
    RedisSettings,
    SessionSettings,
    Settings,
    SupervisorSettings,
)

__all__ = [
    "ApprovalSettings",
    "AuthSettings",
    "BusSettings",
    "CacheSettings",
    "ConfigError",
    "ConfigIssue",
    "DaemonSettings",
    "EmbeddedSettings",
    "HttpSettings",
    "LoadedConfig",
    "PostgresSettings",
    "RedisSettings",
    "SessionSettings",
    "Settings",
    "SupervisorSettings",
    "default_config_path",
    "load_settings",
    "redact_url",
    "redacted",
    "to_toml",
]
