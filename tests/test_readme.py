"""The README's agent-protocol example, run as written against `jarvisd run`
on the default embedded config."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.servers import make_state_dir
from tests.test_daemon_process import REPO, DaemonProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def instance() -> Iterator[Path]:
    folder = make_state_dir("jarvisd-readme-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def example(name: str = "agent-protocol-example") -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(rf"<!-- {name} -->\n```sh\n(.*?)```\n<!-- /{name} -->", text, re.S)
    assert found is not None, f"the README lost its {name}"
    return found.group(1).replace(".venv/bin/jarvisd", f"{sys.executable} -m jarvisd")


async def test_the_readme_agent_protocol_example_works_as_written(instance: Path) -> None:
    d = DaemonProcess(instance)
    try:
        d.wait_ready(60)
        script = example()
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=instance,
            env=d.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert "malformed" in run.stdout  # the dead letter, with its reason
        connector = aiohttp.UnixConnector(path=str(instance / "var" / "jarvisd.sock"))
        async with (
            aiohttp.ClientSession(connector=connector) as s,
            s.get("http://localhost/commands?order=id") as resp,
        ):
            page = await resp.json()
        by_id = {c["requestId"]: c for c in page["items"]}
        assert (by_id["demo-1"]["status"], by_id["demo-1"]["durationMs"]) == ("succeeded", 420)
        assert by_id["demo-1"]["result"] == {"opened": True}
        assert (by_id["demo-2"]["status"], by_id["demo-2"]["riskCategory"]) == (
            "awaiting_approval",
            "HIGH",
        )
    finally:
        d.stop()


async def test_the_readme_approval_example_runs_the_whole_loop(instance: Path) -> None:
    d = DaemonProcess(instance)
    try:
        d.wait_ready(60)
        script = example("approval-example").replace(
            ".venv/bin/python examples/", f"{sys.executable} {REPO}/examples/"
        )
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=instance,
            env={**d.env, "JARVISD_URL": f"http://127.0.0.1:{d.port}"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        out = run.stdout
        assert "delete_file" in out  # the pending request, listed
        assert "[redis] approval.decided approved" in out  # seen on Redis
        assert "[long-poll] approval 1 approved" in out  # and through the long-poll
        assert "succeeded in" in out
        connector = aiohttp.UnixConnector(path=str(instance / "var" / "jarvisd.sock"))
        async with (
            aiohttp.ClientSession(connector=connector) as s,
            s.get("http://localhost/commands?action=delete_file") as resp,
        ):
            (command,) = (await resp.json())["items"]
        assert command["status"] == "succeeded"
        assert command["durationMs"] >= 1
        assert command["result"]["deleted"].endswith("old-notes.txt")
    finally:
        d.stop()
