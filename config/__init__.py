"""jarvisd configuration: typed settings and their loader."""

from config.display import redact_url, redacted, to_toml
from config.loader import (
    ConfigError,
    ConfigIssue,
    LoadedConfig,
    default_config_path,
    load_settings,
)
from config.settings import (
    ApprovalSettings,
    AuthSettings,
    BusSettings,
    CacheSettings,
    DaemonSettings,
    EmbeddedSettings,
    EventSettings,
    HttpSettings,
    PostgresSettings,
    PubSubSettings,
    Quorum,
    RedisSettings,
    RiskRule,
    SessionSettings,
    Settings,
    SupervisorSettings,
)
from config.webhooks import WebhookSettings

__all__ = [
    "ApprovalSettings",
    "AuthSettings",
    "BusSettings",
    "CacheSettings",
    "ConfigError",
    "ConfigIssue",
    "DaemonSettings",
    "EmbeddedSettings",
    "EventSettings",
    "HttpSettings",
    "LoadedConfig",
    "PostgresSettings",
    "PubSubSettings",
    "Quorum",
    "RedisSettings",
    "RiskRule",
    "SessionSettings",
    "Settings",
    "SupervisorSettings",
    "WebhookSettings",
    "default_config_path",
    "load_settings",
    "redact_url",
    "redacted",
    "to_toml",
]
