"""A real headless Chromium for the console's tests and benchmark, driven by
Playwright's Python API with the system's browser (Debian's ``chromium``).

``JARVISD_TEST_BROWSER`` names the browser (default: ``chromium`` on the
PATH). Without one, or without Playwright, browser tests are skipped with
the reason; with ``JARVISD_TEST_BROWSER_REQUIRED=1`` (``.ci/run`` sets it)
they fail instead, so that CI never passes by skipping them. Screenshots go
to ``JARVISD_TEST_ARTIFACTS`` (default: the test's temporary folder).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

# As the machine's own checks start it: no sandbox as root, nothing fetched
# from the network behind the page's back, no first-run screens.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def browser_path() -> str | None:
    named = os.environ.get("JARVISD_TEST_BROWSER")
    if named:
        return named if Path(named).exists() else shutil.which(named)
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _missing(why: str) -> None:
    if os.environ.get("JARVISD_TEST_BROWSER_REQUIRED") == "1":
        pytest.fail(f"browser tests are required here, but {why}")
    pytest.skip(why)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A browser (Playwright's Browser): each person gets a context of their
    own (``new_context``), as separate as two browsers. Closed on exit."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _missing("Playwright is not installed (pip install playwright)")
    path = browser_path()
    if path is None:
        _missing("no Chromium found (apt-get install chromium, or set JARVISD_TEST_BROWSER)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


def artifacts(default: Path) -> Path:
    where = Path(os.environ.get("JARVISD_TEST_ARTIFACTS") or default) / "console"
    where.mkdir(parents=True, exist_ok=True)
    return where
