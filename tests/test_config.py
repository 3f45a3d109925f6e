"""Configuration: TOML, environment, secrets, errors (DESIGN §9, §13)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.redis_link import cluster_seeds, is_cluster, node_url
from config import ConfigError, load_settings, redact_url, redacted

REPO = Path(__file__).resolve().parent.parent
EXTERNAL = {
    "JARVISD_POSTGRES__DSN": "postgresql://u:pw@db/j",
    "JARVISD_REDIS__URL": "redis://r:6379/0",
}


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ./jarvisd.toml unless a test writes one."""
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_repository_default_config_is_valid_and_embedded() -> None:
    loaded = load_settings(REPO / "jarvisd.toml", env={})
    s = loaded.settings
    assert s.embedded.enabled
    assert s.embedded_postgres
    assert s.embedded_redis
    assert s.http.port == 8017
    assert s.daemon.state_dir == str(REPO / "var")


def test_a_typo_names_the_key_path_and_what_was_expected(tmp_path: Path) -> None:
    cfg = write(tmp_path / "j.toml", "[embedded]\nenabled = true\n[postgres]\npool_maxx = 3\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    (issue,) = err.value.issues
    assert issue.key == "postgres.pool_maxx"
    assert issue.source == str(cfg)
    assert "unknown key" in issue.message
    assert "pool_max" in issue.message


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "j.toml",
        '[http]\nport = 99999\n[postgres]\npool_min = "two"\n[nope]\nx = 1\n[daemon]\nlog_level = "loud"\n',
    )
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={"JARVISD_HTTP__MAX_BODY_BYTES": "lots"})
    keys = {i.key for i in err.value.issues}
    assert {
        "http.port",
        "postgres.pool_min",
        "nope",
        "daemon.log_level",
        "http.max_body_bytes",
    } <= keys
    port = next(i for i in err.value.issues if i.key == "http.port")
    assert port.message == "must be at most 65535"
    level = next(i for i in err.value.issues if i.key == "daemon.log_level")
    assert "'loud' is not one of 'debug', 'info'" in level.message
    env_issue = next(i for i in err.value.issues if i.key == "http.max_body_bytes")
    assert env_issue.source == "environment JARVISD_HTTP__MAX_BODY_BYTES"


def test_invalid_toml_is_reported_with_its_position(tmp_path: Path) -> None:
    cfg = write(tmp_path / "j.toml", "[http\nport = 1\n")
    with pytest.raises(ConfigError, match=r"invalid TOML.*line 1"):
        load_settings(cfg, env={})


def test_a_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "absent.toml", env={})


def test_environment_overrides_the_file_with_typed_values(tmp_path: Path) -> None:
    cfg = write(tmp_path / "j.toml", "[embedded]\nenabled = true\n[http]\nport = 8100\n")
    env = {
        "JARVISD_HTTP__PORT": "9000",
        "JARVISD_POSTGRES__MIGRATE_ON_START": "false",
        "JARVISD_DAEMON__SHUTDOWN_TIMEOUT": "7.5",
    }
    s = load_settings(cfg, env=env).settings
    assert s.http.port == 9000
    assert s.postgres.migrate_on_start is False
    assert s.daemon.shutdown_timeout == 7.5


def test_an_unknown_environment_override_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={**EXTERNAL, "JARVISD_HTTP__PROT": "1"})
    assert [i.key for i in err.value.issues] == ["http.prot"]


def test_a_dsn_from_the_environment_switches_postgres_to_external(tmp_path: Path) -> None:
    cfg = write(tmp_path / "j.toml", "[embedded]\nenabled = true\n")
    s = load_settings(cfg, env={"JARVISD_POSTGRES__DSN": "postgresql://x@h/db"}).settings
    assert not s.embedded_postgres
    assert s.embedded_redis


def test_relative_paths_resolve_against_the_config_files_folder(tmp_path: Path) -> None:
    folder = tmp_path / "instance"
    folder.mkdir()
    cfg = write(
        folder / "j.toml",
        '[daemon]\nstate_dir = "var"\n[http]\nunix_socket = "var/j.sock"\n'
        "[embedded]\nenabled = true\n",
    )
    s = load_settings(cfg, env={}).settings
    assert s.daemon.state_dir == str(folder / "var")
    assert s.http.unix_socket == str(folder / "var" / "j.sock")


def test_secrets_come_from_dsn_file(tmp_path: Path) -> None:
    write(tmp_path / "pg.secret", "postgresql://app:s3cret@db:5432/jarvis\n")
    cfg = write(
        tmp_path / "j.toml", '[postgres]\ndsn_file = "pg.secret"\n[redis]\nurl = "redis://r"\n'
    )
    s = load_settings(cfg, env={}).settings
    assert s.postgres.dsn == "postgresql://app:s3cret@db:5432/jarvis"


def test_secrets_come_from_the_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    write(creds / "postgres.dsn", "postgresql://app:pw@db/j")
    write(creds / "redis.url", "redis://:pw@r:6379/0")
    s = load_settings(None, env={"CREDENTIALS_DIRECTORY": str(creds)}).settings
    assert s.postgres.dsn == "postgresql://app:pw@db/j"
    assert s.redis.url == "redis://:pw@r:6379/0"


def test_dsn_and_dsn_file_together_are_rejected(tmp_path: Path) -> None:
    write(tmp_path / "pg.secret", "postgresql://a@b/c")
    cfg = write(
        tmp_path / "j.toml",
        '[postgres]\ndsn = "postgresql://x@y/z"\ndsn_file = "pg.secret"\n'
        '[redis]\nurl = "redis://r"\n',
    )
    with pytest.raises(ConfigError, match="either dsn or dsn_file"):
        load_settings(cfg, env={})


def test_an_unreadable_secret_file_is_reported(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "j.toml", '[postgres]\ndsn_file = "missing"\n[redis]\nurl = "redis://r"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert err.value.issues[0].key == "postgres.dsn_file"


def test_cross_field_rules_are_checked(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "j.toml",
        "[postgres]\npool_min = 5\npool_max = 2\n[sessions]\nidle_ttl = 100\nabsolute_ttl = 10\n",
    )
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env=EXTERNAL)
    assert {i.key for i in err.value.issues} == {"postgres.pool_min", "sessions.idle_ttl"}


def test_external_mode_needs_a_dsn_and_a_url() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env={})
    assert {i.key for i in err.value.issues} == {"postgres.dsn", "redis.url"}


def test_redaction_hides_passwords_only() -> None:
    assert redact_url("postgresql://app:s3cret@db:5432/j") == "postgresql://app:***@db:5432/j"
    assert redact_url("redis://:pw@r:6379/0") == "redis://:***@r:6379/0"
    assert redact_url("postgresql://app@db/j") == "postgresql://app@db/j"
    s = load_settings(
        None,
        env={
            "JARVISD_POSTGRES__DSN": "postgresql://a:pw@h/d",
            "JARVISD_REDIS__URL": "redis://:pw@h",
        },
    ).settings
    shown = redacted(s)
    assert "pw" not in str(shown)


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("JARVISD_") and k != "CREDENTIALS_DIRECTORY"
    }
    return subprocess.run(
        [sys.executable, "-m", "jarvisd", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, **(env or {})},
        timeout=60,
        check=False,
    )


def test_check_config_exits_2_naming_the_typo(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "jarvisd.toml",
        (REPO / "jarvisd.toml").read_text() + "\n[postgres]\npool_maxx = 3\n",
    )
    proc = run_cli("check-config", "--config", str(cfg))
    assert proc.returncode == 2
    assert "postgres.pool_maxx" in proc.stderr
    assert str(cfg) in proc.stderr
    assert proc.stdout == ""


def test_check_config_prints_the_effective_config_with_secrets_redacted(tmp_path: Path) -> None:
    proc = run_cli(
        "check-config",
        env={
            "JARVISD_POSTGRES__DSN": "postgresql://app:hunter2@db/j",
            "JARVISD_REDIS__URL": "redis://:hunter2@r:6379/0",
        },
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout
    assert 'dsn = "postgresql://app:***@db/j"' in proc.stdout
    assert "[approvals]" in proc.stdout


def test_check_config_finds_jarvisd_toml_in_the_working_directory(tmp_path: Path) -> None:
    write(tmp_path / "jarvisd.toml", "[embedded]\nenabled = true\n[http]\nport = 8123\n")
    proc = run_cli("check-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "port = 8123" in proc.stdout
    assert str(tmp_path / "jarvisd.toml") in proc.stdout


def test_version_prints_the_version() -> None:
    proc = run_cli("version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("jarvisd ")


def test_the_full_example_lists_every_key_with_its_default() -> None:
    import tomllib

    import msgspec

    from config import Settings

    example = tomllib.loads(
        (Path(__file__).parent.parent / "config/examples/full.toml").read_text()
    )
    defaults = msgspec.to_builtins(Settings())
    hooks = defaults.pop("webhooks")
    assert (
        list(hooks) == []
    )  # none by default: one is shown commented out, every key with its default
    text = (Path(__file__).parent.parent / "config/examples/full.toml").read_text()
    shown = "\n".join(
        line[2:] for line in text.split("# [[webhooks]]\n", 1)[1].splitlines() if line
    )
    from config import WebhookSettings

    hook = tomllib.loads(shown)
    fields = {f.name for f in msgspec.structs.fields(WebhookSettings)} - {"secret"}
    assert set(hook) == fields
    expect = msgspec.json.decode(
        msgspec.json.encode(WebhookSettings(name="ops", url="https://ops.example/x"))
    )
    for key in ("types", "format", "max_attempts", "timeout", "backoff", "backoff_max"):
        assert hook[key] == expect[key], key
    for section, values in defaults.items():
        for key, value in values.items():
            if value is None:
                continue  # unset by default: shown commented out
            assert key in example.get(section, {}), f"{section}.{key} missing from full.toml"
            assert example[section][key] == value, f"{section}.{key}"
    for section, values in example.items():
        assert set(values) <= set(defaults[section]), section


def test_a_redis_cluster_url_names_its_seeds_and_its_password_is_redacted() -> None:
    url = "redis+cluster://:s3cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002,[::2]/0"
    s = load_settings(None, env={**EXTERNAL, "JARVISD_REDIS__URL": url}).settings
    assert is_cluster(s.redis.url or "", s.redis)
    first, seeds = cluster_seeds(url)
    assert first == "redis://:s3cret@10.0.0.1:7000/0"
    assert seeds == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002), ("::2", 6379)]
    assert node_url(url, "10.0.0.9", 7005) == "redis://:s3cret@10.0.0.9:7005"
    assert "s3cret" not in redact_url(url)


def test_cluster_settings_that_cannot_work_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(
            None,
            env={
                **EXTERNAL,
                "JARVISD_REDIS__URL": "unix:///run/redis.sock",
                "JARVISD_REDIS__CLUSTER": "true",
                "JARVISD_REDIS__PREFIX": "{app}:",
            },
        )
    assert [(i.key, i.message) for i in err.value.issues] == [
        ("redis.url", "a Redis Cluster is reached over TCP, not unix://"),
        ("redis.prefix", "must not contain { or }"),
    ]


def test_a_list_in_an_environment_variable_is_written_as_json(tmp_path: Path) -> None:
    cfg = tmp_path / "jarvisd.toml"
    cfg.write_text("[embedded]\nenabled = true\n")
    loaded = load_settings(cfg, env={"JARVISD_PUBSUB__CHANNELS": '["user_activity", "bench-*"]'})
    assert loaded.settings.pubsub.channels == ["user_activity", "bench-*"]
    with pytest.raises(ConfigError, match=r"pubsub\.channels"):
        load_settings(cfg, env={"JARVISD_PUBSUB__CHANNELS": '["unterminated'})


@pytest.mark.parametrize("channel", ["*", "j*", "jarvis:events", "jarvis:*", "?x", "[a-z]*"])
def test_a_pass_through_channel_may_never_reach_the_daemons_channels_or_an_inbox(
    tmp_path: Path, channel: str
) -> None:
    cfg = tmp_path / "jarvisd.toml"
    cfg.write_text(
        f"[embedded]\nenabled = true\n[pubsub]\nchannels = [{channel!r}]\n".replace("'", '"')
    )
    with pytest.raises(ConfigError, match=r"pubsub\.channels\[0\]"):
        load_settings(cfg)
