"""The README's quickstart, run as a newcomer runs it: every block in document
order against one `jarvisd run` on the default embedded config, then all of
them again, with what each says it prints."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import make_state_dir
from tests.test_daemon_process import REPO, DaemonProcess

pytestmark = pytest.mark.slow

BLOCK = re.compile(r"<!-- quickstart: (\w+) -->\n```sh\n(.*?)```\n<!-- /quickstart -->", re.S)


@pytest.fixture
def instance() -> Iterator[Path]:
    folder = make_state_dir("jarvisd-readme-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def blocks(port: int) -> list[tuple[str, str]]:
    """(name, script) of each quickstart block, in document order, made to
    run from a copy of the checkout's config on another port."""
    found = BLOCK.findall((REPO / "README.md").read_text())
    return [
        (
            name,
            script.replace(".venv/bin/jarvisd", f"{sys.executable} -m jarvisd")
            .replace(".venv/bin/python examples/", f"{sys.executable} {REPO}/examples/")
            .replace("localhost:8017", f"localhost:{port}")
            .replace("127.0.0.1:8017", f"127.0.0.1:{port}"),
        )
        for name, script in found
    ]


def check(name: str, out: str, round_: int) -> None:
    """What the README says each block prints."""
    if name == "ready":
        assert "[+]postgres ok" in out
        assert "ready: pass" in out
        users = json.loads(out.strip().splitlines()[-1])
        assert users["items"][0]["username"] == "admin"
    elif name == "agent":
        assert "NOPERM No permissions to access a key" in out
        assert "malformed: JSON is malformed: invalid character (byte 4)" in out
        commands = json.loads(out.strip().splitlines()[-1])["items"]
        assert len(commands) == 1  # exactly once, however often it runs
        assert (commands[0]["status"], commands[0]["durationMs"]) == ("succeeded", 420)
        assert commands[0]["result"] == {"opened": True}
    elif name == "approval":
        assert 'PENDING, HIGH risk 80 (rule "delete*")' in out  # for a person
        assert "sender       agent:demo-agent" in out
        assert "-> awaiting_approval by demo-agent" in out  # the history
        assert '"path": "/tmp/jarvisd-agent-' in out  # the parameters
        assert re.search(r"approval \d+ approved by uid:\d+", out)
        assert "[redis] approval.decided approved" in out
        assert "(a scratch file of its own)" in out
        assert re.search(r"\[long-poll\] approval \d+ approved", out)
        assert re.search(r"command \d+ succeeded in \d+ ms", out)
    else:
        pytest.fail(f"the README has a quickstart block this test does not know: {name}")


@pytest.mark.timeout(240)
async def test_the_quickstart_runs_top_to_bottom_twice_on_one_daemon(instance: Path) -> None:
    d = DaemonProcess(instance)
    try:
        d.wait_ready(60)
        found = blocks(d.port)
        assert [name for name, _ in found] == ["ready", "agent", "approval"]
        for round_ in (1, 2):
            for name, script in found:
                run = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", script],
                    cwd=instance,
                    env={**d.env, "JARVISD_URL": f"http://127.0.0.1:{d.port}"},
                    capture_output=True,
                    text=True,
                    timeout=50,
                    check=False,
                )
                assert run.returncode == 0, (round_, name, run.stdout, run.stderr)
                check(name, run.stdout, round_)
                if name == "agent":  # one dead letter a run (not json), nothing else
                    letters = subprocess.run(
                        [sys.executable, "-m", "jarvisd", "redis-cli", "XLEN", "jarvis:inbox:dead"],
                        cwd=instance,
                        env=d.env,
                        capture_output=True,
                        text=True,
                        timeout=30,
                        check=True,
                    )
                    assert letters.stdout.strip() == str(round_), letters.stdout
        # demo-2 (HIGH) still waits for a person; the example agent's two
        # requests were approved and carried out.
        status, body = get_json(instance, "/commands?action=delete_file&order=id")
        assert status == 200
        by_status = [(c["requestId"], c["status"]) for c in body["items"]]
        assert ("demo-2", "awaiting_approval") in by_status
        assert sum(1 for _r, s in by_status if s == "succeeded") == 2
    finally:
        d.stop()


def get_json(instance: Path, path: str) -> tuple[int, dict[str, object]]:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            str(instance / "var/jarvisd.sock"),
            f"http://localhost{path}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, _, code = out.rpartition("\n")
    return int(code), json.loads(body)
