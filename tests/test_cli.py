"""The command line as a newcomer meets it: versions and help pages, options
before or after the command, usage errors that say where a setting goes, no
configuration file, and no daemon running."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from config.template import default_toml
from jarvisd.cli import build_parser, command_of

REPO = Path(__file__).resolve().parent.parent


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    return subprocess.run(
        [sys.executable, "-m", "jarvisd", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_version_is_an_option_and_a_command() -> None:
    option, command = cli("--version"), cli("version")
    assert option.returncode == command.returncode == 0
    assert option.stdout == command.stdout
    assert option.stdout.startswith("jarvisd ")


def test_the_config_option_goes_before_or_after_the_command(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[embedded]\nenabled = true\n[http]\nport = 8123\n")
    before = cli("--config", str(tmp_path / "a.toml"), "check-config", cwd=tmp_path)
    after = cli("check-config", "-c", str(tmp_path / "a.toml"), cwd=tmp_path)
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert before.stdout == after.stdout
    assert "port = 8123" in before.stdout


def test_an_option_that_is_a_setting_names_its_variable() -> None:
    proc = cli("run", "--port", "9000")
    assert proc.returncode == 2
    assert "unrecognized arguments: --port 9000" in proc.stderr
    assert "JARVISD_HTTP__PORT=9000" in proc.stderr
    assert "[http] port" in proc.stderr
    level = cli("run", "--log-level=debug")
    assert level.returncode == 2
    assert "JARVISD_DAEMON__LOG_LEVEL=debug" in level.stderr


def test_every_help_page_has_a_description_examples_and_help_for_each_argument() -> None:
    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        if not parser.description:
            missing.append(f"{path}: no description")
        if "examples:" not in (parser.epilog or ""):
            missing.append(f"{path}: no examples")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path}: {action.option_strings or action.dest} has no help")

    walk(build_parser(), "jarvisd")
    assert missing == []
    top = cli("--help")
    assert "exit status:" in top.stdout
    assert "JARVISD_HTTP__PORT" in top.stdout
    page = cli("token", "revoke", "--help")
    assert page.returncode == 0
    assert "Revoke a token by id" in page.stdout
    assert "jarvisd token revoke 7" in page.stdout


def test_user_add_requires_a_role() -> None:
    proc = cli("user", "add", "someone")
    assert proc.returncode == 2
    assert "--role" in proc.stderr
    assert "required" in proc.stderr


def test_no_configuration_says_where_it_looked_and_init_writes_the_embedded_default(
    tmp_path: Path,
) -> None:
    for command in (["run"], ["health"], ["user", "list"]):
        proc = cli(*command, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "no configuration found" in proc.stderr
        assert str(tmp_path / "jarvisd.toml") in proc.stderr
        assert "/etc/jarvisd/jarvisd.toml" in proc.stderr
        assert "jarvisd init" in proc.stderr
        assert "postgres.dsn" not in proc.stderr  # nothing the user never wrote
    assert list(tmp_path.iterdir()) == []  # and nothing made

    made = cli("init", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "next: jarvisd run" in made.stderr
    assert (tmp_path / "jarvisd.toml").read_text() == default_toml()
    shown = cli("check-config", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f'state_dir = "{tmp_path / "var"}"' in shown.stdout
    assert "enabled = true" in shown.stdout
    again = cli("init", cwd=tmp_path)
    assert again.returncode == 1
    assert "exists" in again.stderr
    assert (tmp_path / "jarvisd.toml").read_text() == default_toml()

    elsewhere = cli("init", "--config", "conf/j.toml", "--port", "9100", cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "next: jarvisd --config conf/j.toml run" in elsewhere.stderr
    assert "port = 9100" in (tmp_path / "conf/j.toml").read_text()


def test_an_environment_that_is_not_enough_is_named_with_what_is_missing(
    tmp_path: Path,
) -> None:
    proc = cli("check-config", cwd=tmp_path, env={"JARVISD_HTTP__PORT": "9000"})
    assert proc.returncode == 2
    assert "no configuration found" in proc.stderr
    assert "JARVISD_HTTP__PORT" in proc.stderr
    assert "postgres.dsn" in proc.stderr  # what the environment still lacks


def test_the_checkouts_config_is_the_one_init_writes() -> None:
    assert (REPO / "jarvisd.toml").read_text() == default_toml()


@pytest.mark.parametrize(
    "command",
    [
        ["health"],
        ["approvals", "list"],
        ["agent", "list"],
        ["publish", "alerts", "{}"],
        ["subscribe", "alerts"],
        ["redis-url"],
        ["redis-cli", "PING"],
    ],
)
def test_with_no_daemon_running_each_command_says_how_to_start_one(
    tmp_path: Path, command: list[str]
) -> None:
    (tmp_path / "jarvisd.toml").write_text(default_toml("var", free_port()))
    proc = cli(*command, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert "start it with `jarvisd run`" in proc.stderr
    assert "systemctl start jarvisd" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ClientConnectorError" not in proc.stderr


def test_a_test_database_that_cannot_be_used_is_said_once_in_words() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    env["JARVISD_TEST_POSTGRES_DSN"] = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_cli.py::test_version_is_an_option_and_a_command",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "JARVISD_TEST_POSTGRES_DSN: cannot connect" in out
    assert "unset it to run on embedded servers" in out
    assert "Traceback" not in out


def test_the_cli_believes_addresses_only_of_a_daemon_that_is_alive(tmp_path: Path) -> None:
    from jarvisd.cli_common import recorded_addresses

    assert recorded_addresses(tmp_path) == []  # no daemon ever ran here
    record = tmp_path / "jarvisd.pid"
    record.write_text(f"{os.getpid()}\n0\nhttp://127.0.0.1:9 http://unix:/run/x.sock:\n")
    assert recorded_addresses(tmp_path) == ["http://127.0.0.1:9", "http://unix:/run/x.sock:"]
    dead = subprocess.Popen(["true"])  # a pid that has ended
    dead.wait()
    record.write_text(f"{dead.pid}\n0\nhttp://127.0.0.1:9\n")
    assert recorded_addresses(tmp_path) == []  # left by a daemon killed with -9
    record.write_text("")
    assert recorded_addresses(tmp_path) == []  # locked, not yet written
    record.write_text("0\n0\nhttp://127.0.0.1:9\n")
    assert recorded_addresses(tmp_path) == []  # kill(0) would name a process group


def test_a_command_built_alone_is_the_one_in_the_whole_parser() -> None:
    """A run of the CLI builds the parser of its own command only: each one
    built alone helps (and so parses) as it does in the whole parser."""

    def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(sub.choices)

    whole = build_parser()
    for name, full in commands(whole).items():
        alone = commands(build_parser(only=name))[name]
        assert alone.format_help() == full.format_help(), name
    assert build_parser(only="").format_help() == whole.format_help()
    assert command_of(["--config", "x.toml", "approvals", "list"]) == "approvals"
    assert command_of(["-c", "run", "version"]) == "version"
    assert command_of(["--help"]) == ""
