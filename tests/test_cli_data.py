"""`jarvisd user …` and `jarvisd token …` as an operator runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from actors.data.credentials import hash_token, verify_password
from tests.servers import Servers


@pytest.fixture
def config(tmp_path: Path, pg_dsn: str, servers: Servers) -> Path:
    path = tmp_path / "jarvisd.toml"
    path.write_text(f'[postgres]\ndsn = "{pg_dsn}"\n[redis]\nurl = "{servers.redis_url}"\n')
    return path


def jarvisd(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    return subprocess.run(
        [sys.executable, "-m", "jarvisd", *args, "--config", str(config)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


async def row(dsn: str, sql: str, *args: object) -> asyncpg.Record | None:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(sql, *args)
    finally:
        await conn.close()


async def test_user_add_list_passwd_and_disable(config: Path, pg_dsn: str) -> None:
    added = jarvisd(
        config,
        "user",
        "add",
        "ops",
        "--role",
        "admin",
        "--email",
        "ops@example.org",
        "--password-stdin",
        stdin="first password\n",
    )
    assert added.returncode == 0, added.stderr
    assert "created user ops" in added.stdout
    stored = await row(pg_dsn, "SELECT password_hash, role FROM users WHERE username = 'ops'")
    assert stored is not None
    assert stored["role"] == "admin"
    assert verify_password("first password", stored["password_hash"])
    again = jarvisd(config, "user", "add", "OPS", "--role", "user")
    assert again.returncode == 1
    assert "taken" in again.stderr
    listed = jarvisd(config, "user", "list")
    assert listed.returncode == 0
    assert "ops" in listed.stdout
    assert "ops@example.org" in listed.stdout
    changed = jarvisd(
        config, "user", "passwd", "ops", "--password-stdin", stdin="second password\n"
    )
    assert changed.returncode == 0, changed.stderr
    stored = await row(pg_dsn, "SELECT password_hash FROM users WHERE username = 'ops'")
    assert stored is not None
    assert verify_password("second password", stored["password_hash"])
    jarvisd(config, "user", "add", "helper", "--role", "user")
    disabled = jarvisd(config, "user", "disable", "helper")
    assert disabled.returncode == 0
    assert (await row(pg_dsn, "SELECT disabled FROM users WHERE username = 'helper'"))["disabled"]  # type: ignore[index]
    assert jarvisd(config, "user", "disable", "ghost").returncode == 1
    short = jarvisd(config, "user", "passwd", "ops", "--password-stdin", stdin="short\n")
    assert short.returncode == 1


async def test_token_create_prints_the_token_alone_and_revoke_ends_it(
    config: Path, pg_dsn: str
) -> None:
    assert jarvisd(config, "user", "add", "agent-1", "--role", "agent").returncode == 0
    created = jarvisd(config, "token", "create", "--user", "agent-1", "--name", "voice")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("jv_")
    assert created.stdout == token + "\n"  # alone on stdout, for scripts
    stored = await row(
        pg_dsn,
        "SELECT id, name, revoked_at FROM api_tokens WHERE token_hash = $1",
        hash_token(token),
    )
    assert stored is not None
    assert stored["name"] == "voice"
    revoked = jarvisd(config, "token", "revoke", str(stored["id"]))
    assert revoked.returncode == 0, revoked.stderr
    after = await row(pg_dsn, "SELECT revoked_at FROM api_tokens WHERE id = $1", stored["id"])
    assert after is not None
    assert after["revoked_at"] is not None
    assert jarvisd(config, "token", "create", "--user", "nobody-here").returncode == 1
    assert jarvisd(config, "token", "revoke", "999999").returncode == 1


async def test_token_list_shows_the_ids_revoke_needs(config: Path) -> None:
    for name in ("lister-a", "lister-b"):
        assert jarvisd(config, "user", "add", name, "--role", "user").returncode == 0
    assert (
        jarvisd(config, "token", "create", "--user", "lister-a", "--name", "laptop").returncode == 0
    )
    assert jarvisd(config, "token", "create", "--user", "lister-b", "--name", "ci").returncode == 0

    def rows(*args: str) -> dict[str, list[str]]:
        listed = jarvisd(config, "token", "list", *args)
        assert listed.returncode == 0, listed.stderr
        header, *lines = listed.stdout.splitlines()
        assert header.split()[:4] == ["ID", "USER", "NAME", "PREFIX"]
        return {line.split()[2]: line.split() for line in lines if "lister-" in line}

    everyone = rows()
    assert set(everyone) == {"laptop", "ci"}
    assert everyone["laptop"][1] == "lister-a"
    assert everyone["laptop"][-1] == "live"
    mine = rows("--user", "lister-b")
    assert set(mine) == {"ci"}
    revoked = jarvisd(config, "token", "revoke", everyone["laptop"][0])
    assert revoked.returncode == 0, revoked.stderr
    assert rows()["laptop"][-1] == "revoked"
    unknown = jarvisd(config, "token", "list", "--user", "nobody-at-all")
    assert unknown.returncode == 1
    assert "nobody-at-all" in unknown.stderr


def test_the_data_commands_load_neither_the_http_stack_nor_the_redis_client(config: Path) -> None:
    """`jarvisd user list` talks to PostgreSQL alone: aiohttp and redis-py,
    which cost more than its own work at every call, stay unloaded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    listed = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "jarvisd",
            "user",
            "list",
            "--config",
            f"{config}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert listed.stdout.split()[:2] == ["ID", "USERNAME"]
    loaded = {
        line.rsplit("|", 1)[1].strip()
        for line in listed.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "asyncpg" in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in ("aiohttp", "redis")) == []
