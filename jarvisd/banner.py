"""The first lines a person sees on a terminal: once the daemon is ready (the
database reached and the first admin's token written, as ``/health/ready``
says), where it answers, where the admin token is, and how to stop it.
Logged as ``ready`` in every case; the banner only on a terminal."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import structlog

__all__ = ["announce_ready", "banner"]

log = structlog.get_logger("jarvisd").bind(actor="daemon")


def _short(path: Path) -> str:
    """A path as a person types it: relative to the working directory when inside it."""
    try:
        return os.path.join(".", path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cli_name() -> str:
    """How this shell reaches the CLI: ``jarvisd`` when it is on PATH, else
    the path it was started by (``./.venv/bin/jarvisd`` in a checkout)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "jarvisd"
    if argv0.endswith("__main__.py"):
        return f"{_short(Path(sys.executable))} -m jarvisd"
    found = shutil.which("jarvisd")
    if found and os.path.realpath(found) == os.path.realpath(argv0):
        return "jarvisd"
    return _short(Path(argv0)) if os.sep in argv0 else argv0


def banner(
    version: str, seconds: float, addresses: list[str], state_dir: Path, config: Path | None
) -> str:
    tcp = [a for a in addresses if a.startswith("http://") and not a.startswith("http://unix:")]
    sockets = [a.removeprefix("http://unix:").rstrip(":") for a in addresses if "unix:" in a]
    token = state_dir / "admin-token"
    here = "" if config is None or config.parent == Path.cwd() else f" --config {_short(config)}"
    cli = cli_name() + here
    lines = [f"jarvisd {version} is ready ({seconds:.1f} s)"]
    for url in tcp:
        lines.append(f"  API      {url}  (GET / says where to go)")
    if tcp:
        lines.append(f"  console  {tcp[0]}/console  (approvals in the browser: log in as a person)")
    for path in sockets:
        lines.append(f"  CLI      {cli} approvals list  (the local admin, on {_short(Path(path))})")
    if token.exists():
        lines.append(f"  token    {_short(token)}  (the first admin's API token, mode 0600)")
        if tcp:
            lines.append(
                f'           curl -H "Authorization: Bearer $(cat {_short(token)})" {tcp[0]}/users'
            )
    else:
        lines.append(f"  token    {cli} token create --user admin  (prints a new one)")
    lines.append("  stop     Ctrl-C (drains, then stops PostgreSQL and Valkey when embedded)")
    return "\n".join(lines) + "\n"


async def announce_ready(
    is_ready: Callable[[], bool],
    started: float,
    facts: Callable[[], dict[str, Any]],
    out: TextIO | None = None,
) -> None:
    """Wait until ``is_ready()``, then log ``ready`` and, on a terminal, print
    the banner."""
    while not is_ready():
        await asyncio.sleep(0.05)
    seconds = time.monotonic() - started
    found = facts()
    log.info("ready", seconds=round(seconds, 3), listening=found["addresses"])
    out = sys.stderr if out is None else out
    if out.isatty():
        out.write(
            "\n"
            + banner(
                found["version"], seconds, found["addresses"], found["state_dir"], found["config"]
            )
            + "\n"
        )
        out.flush()
