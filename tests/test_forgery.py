"""Redis is writable by agents: nothing read back from it is authority unless
the daemon can prove it wrote it. Each attack is run as an agent holding the
daemon's Redis would run it; each is refused."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from actors.sessions import user_tag
from tests.test_api import Api
from tests.test_security import admin_id, api, config_overrides, login

__all__ = ["api", "config_overrides"]  # fixtures shared with the security tests


def login_key(api: Api, session_id: str) -> str:
    prefix = api.r.daemon.settings.redis.prefix
    ref = hashlib.sha256(session_id.encode()).hexdigest()
    return f"{prefix}login:{{{session_id[:4]}}}{ref}"


async def status_of(api: Api, token: str) -> int:
    status, _h, _b = await api.call("GET", "/users", token=token)
    return status


async def test_a_login_session_whose_user_was_changed_in_redis_is_no_session(
    api: Api, raw: aioredis.Redis
) -> None:
    await api.user("mallory", password="mallory password")
    session = await login(api, "mallory", "mallory password")
    admin = await admin_id(api)
    await raw.hset(login_key(api, session), "uid", str(admin))  # before its first use
    assert await status_of(api, session) == 401
    assert api.r.daemon.supervisor.get("logins").forged >= 1


async def test_a_record_written_under_a_chosen_id_is_no_session(
    api: Api, raw: aioredis.Redis
) -> None:
    admin = await admin_id(api)
    await api.user("plain-user", password="plain password")
    real = await login(api, "plain-user", "plain password")
    fields: dict[Any, Any] = await raw.hgetall(login_key(api, real))
    chosen = user_tag(admin) + "A" * 43  # an id the attacker picks
    # The admin's user id, everything else copied from a record the daemon signed.
    forged = {**fields, b"uid": str(admin).encode()}
    await raw.hset(login_key(api, chosen), mapping=forged)
    await raw.pexpire(login_key(api, chosen), 60_000)
    assert await status_of(api, chosen) == 401
    # A signed record moved under another id does not verify either.
    moved = user_tag(admin) + "B" * 43
    own = {**fields}
    await raw.hset(login_key(api, moved), mapping=own)
    await raw.pexpire(login_key(api, moved), 60_000)
    assert await status_of(api, moved) == 401
    assert await status_of(api, real) == 403  # the real one still works (a plain user)


async def test_a_longer_deadline_written_into_a_session_ends_it(
    api: Api, raw: aioredis.Redis
) -> None:
    await api.user("keeps-on", password="keeps password")
    session = await login(api, "keeps-on", "keeps password")
    deadline = int(await raw.hget(login_key(api, session), "abs") or 0)
    await raw.hset(login_key(api, session), "abs", str(deadline + 10**9))
    assert await status_of(api, session) == 401


def _cli(api: Api, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The command line as an operator on the host runs it, on this test's servers."""
    s = api.r.daemon.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    env |= {
        "JARVISD_POSTGRES__DSN": str(s.postgres.dsn),
        "JARVISD_REDIS__URL": str(s.redis.url),
        "JARVISD_REDIS__PREFIX": s.redis.prefix,
    }
    return subprocess.run(
        [sys.executable, "-m", "jarvisd", *args, "--config", os.devnull],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
        cwd=Path(__file__).parent,
    )


async def _until_refused(api: Api, token: str, timeout: float = 8.0) -> None:
    async with asyncio.timeout(timeout):
        while await status_of(api, token) != 401:
            await asyncio.sleep(0.1)


async def test_rotating_the_key_ends_every_login_session(api: Api) -> None:
    await api.user("rotated", role="admin", password="rotated password")
    session = await login(api, "rotated", "rotated password")
    assert await status_of(api, session) == 200
    done = await asyncio.to_thread(_cli, api, "logins", "rotate-key")
    assert done.returncode == 0, done.stderr
    await _until_refused(api, session)
    fresh = await login(api, "rotated", "rotated password")  # a new login works at once
    assert await status_of(api, fresh) == 200


async def test_a_password_changed_or_a_user_disabled_from_the_cli_ends_their_login_sessions(
    api: Api,
) -> None:
    await api.user("cli-target", role="admin", password="target password 1")
    first = await login(api, "cli-target", "target password 1")
    done = await asyncio.to_thread(_cli, api, "user", "passwd", "cli-target", "--password-stdin")
    assert done.returncode == 1  # no password given on stdin: refused, nothing changed
    assert await status_of(api, first) == 200
    changed = await asyncio.to_thread(
        _cli, api, "user", "passwd", "cli-target", "--password-stdin", stdin="target password 2\n"
    )
    assert changed.returncode == 0, changed.stderr
    await _until_refused(api, first)
    second = await login(api, "cli-target", "target password 2")
    assert await status_of(api, second) == 200
    for flags in (("user", "disable", "cli-target"), ("user", "disable", "cli-target", "--enable")):
        done = await asyncio.to_thread(_cli, api, *flags)
        assert done.returncode == 0, done.stderr
    # Disabled, then enabled again: the session made before stays ended.
    await _until_refused(api, second)
