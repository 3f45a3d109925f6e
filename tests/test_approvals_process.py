"""Approvals across real `jarvisd run` processes sharing PostgreSQL and Redis:
one expiry sweeper at a time and a takeover after kill -9, and the
`jarvisd approvals` commands a person at the host uses."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.servers import make_state_dir
from tests.test_bus_process import cli, shared_env
from tests.test_daemon_process import DaemonProcess, get

pytestmark = pytest.mark.slow


@pytest.fixture
def folders() -> Iterator[list[Path]]:
    made = [make_state_dir("jarvisd-appr-") for _ in range(2)]
    yield made
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


def sweeper_of(d: DaemonProcess) -> dict[str, Any]:
    status, body = get(d.port, "/stats")
    assert status == 200, body
    return json.loads(body)["actors"]["approvals"]["approvals"]  # type: ignore[no-any-return]


async def until(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_two_daemons_sweep_one_at_a_time_and_the_other_takes_over_after_kill_9(
    folders: list[Path], pg_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    env = {
        **shared_env(pg_dsn, redis_url, redis_prefix),
        "JARVISD_APPROVALS__SWEEP_INTERVAL": "0.2",
    }
    a, b = DaemonProcess(folders[0], env=env), DaemonProcess(folders[1], env=env)
    db = await asyncpg.connect(pg_dsn)
    try:
        a.wait_ready(30)
        b.wait_ready(30)
        await until(lambda: sweeper_of(a)["sweeper"] or sweeper_of(b)["sweeper"], 10)
        for _ in range(10):  # and it stays that way
            assert [sweeper_of(a)["sweeper"], sweeper_of(b)["sweeper"]].count(True) == 1
            await asyncio.sleep(0.1)
        leader, other = (a, b) if sweeper_of(a)["sweeper"] else (b, a)
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait(10)
        killed_at = time.monotonic()
        await until(lambda: sweeper_of(other)["sweeper"], 10)
        print(f"takeover after kill -9: {time.monotonic() - killed_at:.2f}s")
        # The survivor does the work: a request past its deadline is expired.
        approval_id = await db.fetchval(
            "INSERT INTO approval_requests (action, parameters_digest, risk_score, risk_category, "
            "status, expires_at) VALUES ('x', '', 80, 'HIGH', 'pending', now() + interval '1 s') "
            "RETURNING id"
        )
        deadline = time.monotonic() + 10
        while (
            await db.fetchval("SELECT status FROM approval_requests WHERE id = $1", approval_id)
            != "expired"
        ):
            assert time.monotonic() < deadline, "the survivor did not expire the request"
            await asyncio.sleep(0.1)
        assert sweeper_of(other)["expired"] == 1
    finally:
        for d in (a, b):
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
                d.proc.wait(30)
            d.stop()
        await db.close()


async def test_a_person_lists_shows_approves_and_rejects_from_the_shell(
    folders: list[Path], pg_dsn: str, redis_url: str, redis_prefix: str
) -> None:
    env = shared_env(pg_dsn, redis_url, redis_prefix)
    d = DaemonProcess(folders[0], env=env)
    folder = folders[0]
    try:
        d.wait_ready(30)
        env = {**env, "JARVISD_HTTP__PORT": str(d.port)}
        assert cli(folder, env, "user", "add", "asker", "--role", "user").returncode == 0
        assert cli(folder, env, "user", "add", "ann", "--role", "approver").returncode == 0
        asker = cli(folder, env, "token", "create", "--user", "asker").stdout.strip()
        ann = cli(folder, env, "token", "create", "--user", "ann").stdout.strip()
        assert cli(folder, env, "approvals", "list", "-q").stdout == ""  # nothing waits yet
        ids = []
        for action in ("delete_file", "transfer_money"):
            out = await _post(
                d.port, asker, {"action": action, "parameters": {"path": "/etc/<x>\x1b[31m"}}
            )
            ids.append(out["approvalId"])
        listed = cli(folder, env, "approvals", "list")
        assert listed.returncode == 0, listed.stderr
        assert "delete_file" in listed.stdout
        assert "transfer_money" in listed.stdout
        quiet = cli(folder, env, "approvals", "list", "-q").stdout.split()
        assert quiet == [str(i) for i in ids]  # oldest first
        shown = cli(folder, env, "approvals", "show", str(ids[0]), "--json")
        assert json.loads(shown.stdout)["status"] == "pending"
        # For a person: who asked by name, the rule, the parameters, the history.
        listed_lines = listed.stdout.splitlines()
        assert listed_lines[0].split()[:5] == ["ID", "STATUS", "RISK", "ACTION", "REQUESTER"]
        assert "asker" in listed_lines[1]
        person = cli(folder, env, "approvals", "show", str(ids[0]))
        assert person.returncode == 0, person.stderr
        assert f'approval {ids[0]}: PENDING, HIGH risk 80 (rule "delete*")' in person.stdout
        assert "requester    asker" in person.stdout
        assert "sender       user:asker" in person.stdout
        assert '"path": "/etc/<x>\\u001b[31m"' in person.stdout
        assert "\x1b" not in person.stdout  # the agent's escape is shown, not sent
        assert "(new) -> awaiting_approval by asker" in person.stdout
        assert f"jarvisd approvals approve {ids[0]}" in person.stdout
        # As ann (a token), then as the local admin (the Unix socket).
        approved = cli(folder, env, "approvals", "approve", str(ids[0]), "--token", ann)
        assert approved.returncode == 0, approved.stderr
        assert f"approval {ids[0]} approved by ann" in approved.stdout
        again = cli(folder, env, "approvals", "approve", str(ids[0]))
        assert again.returncode == 1
        assert "409" in again.stderr
        assert "already approved" in again.stderr
        no_reason = cli(folder, env, "approvals", "reject", str(ids[1]))
        assert no_reason.returncode == 2  # argparse: --reason is required
        own = cli(
            folder, env, "approvals", "reject", str(ids[1]), "--reason", "x", "--token", asker
        )
        assert own.returncode == 1
        assert "403" in own.stderr
        rejected = cli(folder, env, "approvals", "reject", str(ids[1]), "--reason", "too much")
        assert rejected.returncode == 0, rejected.stderr
        assert "rejected" in rejected.stdout
        everything = json.loads(
            cli(folder, env, "approvals", "list", "--status", "", "--json").stdout
        )
        assert [(a["status"], a["reason"]) for a in everything] == [
            ("approved", None),
            ("rejected", "too much"),
        ]
        missing = cli(folder, env, "approvals", "show", "999999")
        assert (missing.returncode, "404" in missing.stderr) == (1, True)
        await _publish_and_subscribe(folder, env)
        await _follow_the_log(folder, env)
    finally:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            d.proc.wait(30)
        d.stop()


async def _publish_and_subscribe(folder: Path, env: dict[str, str]) -> None:
    """`subscribe` says on stderr what it listens to, `publish` how many got it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    with subprocess.Popen(
        [sys.executable, "-m", "jarvisd", "subscribe", "user_activity"],
        cwd=folder,
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as sub:
        try:
            assert sub.stderr is not None
            assert sub.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(sub.stderr.readline), 30)
            assert line == "subscribed to user_activity (Ctrl-C stops)\n"
            published = cli(folder, env, "publish", "user_activity", '{"hello": 1}')
            assert published.returncode == 0, published.stderr
            assert published.stdout == "published on user_activity: 1 receiver\n"
            got = json.loads(await asyncio.wait_for(asyncio.to_thread(sub.stdout.readline), 30))
            assert (got["type"], got["channel"], got["data"]) == (
                "message",
                "user_activity",
                {"hello": 1},
            )
        finally:
            sub.send_signal(signal.SIGINT)
            try:
                code = await asyncio.to_thread(sub.wait, 30)
            except subprocess.TimeoutExpired:
                sub.kill()
                _out, err = sub.communicate()
                raise AssertionError(f"subscribe did not stop on Ctrl-C; it said: {err}") from None
            assert code == 0


async def _follow_the_log(folder: Path, env: dict[str, str]) -> None:
    """`subscribe --since 0` prints what the log kept, in id order, then waits."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    with subprocess.Popen(
        [sys.executable, "-m", "jarvisd", "subscribe", "--since", "0", "--kind", "approvals"],
        cwd=folder,
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as log:
        try:
            assert log.stdout is not None
            seen: list[dict[str, Any]] = []
            while len(seen) < 4:  # two requested, one approved, one rejected
                line = await asyncio.wait_for(asyncio.to_thread(log.stdout.readline), 30)
                seen.append(json.loads(line))
            assert [e["type"] for e in seen] == [
                "approval.requested",
                "approval.requested",
                "approval.decided",
                "approval.decided",
            ]
            ids = [int(e["id"]) for e in seen]
            assert ids == sorted(ids)
            assert log.poll() is None  # following, for what comes next
        finally:
            log.send_signal(signal.SIGINT)
            assert log.wait(30) == 0


async def _post(port: int, token: str, body: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{port}/commands",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        return dict(await resp.json())
