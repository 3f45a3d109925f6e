"""The approvals console, measured in a real headless Chromium.

    python -m bench.console [--pending 1000] [--decisions 200] [--loads 20] [--json FILE]

A separate `jarvisd run` holds ``--pending`` pending requests. A person
(an approver with a password) logs in to /console in Debian's Chromium
(driven by Playwright; ``JARVISD_TEST_BROWSER`` names another browser).

- **First screen.** The page is loaded ``--loads`` times; each time the
  figure is the time from the start of the navigation to the first page of
  pending requests drawn and usable (the page's own
  ``performance.mark("jarvisd:pending-ready")``). Its floor, measured in the
  same loads, is the page's own request for that first page
  (``GET /approvals?status=pending&limit=50``, from its start to its last
  byte, by the browser's Resource Timing): what drawing adds is the rest.
  Target: < 300 ms.
- **A decision on the page reaches the agent.** For ``--decisions`` of the
  requests, an agent waits on `GET /approvals/{id}?wait=55` (a reader process
  holds one keep-alive connection each, as bench.approvals does). The person
  opens each request on the page and clicks Approve; the figure is from the
  click (the click event's own time in the page) to the agent's answer (in
  the reader process), both on the host's wall clock. Its floor is the
  decision's own round trip as the page saw it (the PUT, by Resource Timing).
  Target: p99 < 50 ms.

Servers: JARVISD_TEST_POSTGRES_DSN / JARVISD_TEST_REDIS_URL, else embedded ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from typing import Any

import aiohttp
from playwright.async_api import async_playwright, expect

from bench.approvals import hold_waiters
from bench.bus import pct
from bench.daemon import bench_daemon, run_bench
from bench.report import Report
from tests.browser import CHROMIUM_ARGS, browser_path

PASSWORD = secrets.token_urlsafe(18)  # the bench approver's, for this run
STATS = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))


async def setup(base: str, admin: str, n: int) -> tuple[str, list[int]]:
    """An approver with a password, a requester with ``n`` pending requests:
    (the requester's token, the ids, oldest first)."""
    headers = {"Authorization": f"Bearer {admin}"}
    async with aiohttp.ClientSession(base_url=base, headers=headers) as s:
        body = {"username": "approver", "role": "approver", "password": PASSWORD}
        async with s.post("/users", json=body) as resp:
            assert resp.status == 201, await resp.text()
        async with s.post("/users", json={"username": "requester", "role": "user"}) as resp:
            user = await resp.json()
        async with s.post(f"/users/{user['id']}/tokens", json={"name": "bench"}) as resp:
            token = (await resp.json())["token"]
    ids: list[int] = []
    async with aiohttp.ClientSession(
        base_url=base, headers={"Authorization": f"Bearer {token}"}
    ) as s:

        async def make(k: int) -> None:
            for _ in range(k):
                body = {
                    "action": "transfer_money",
                    "riskScore": 80,
                    "expiresIn": 3600,
                    "description": "pay the supplier's invoice",
                    "parameters": {"to": "ACME Ltd", "eur": 1250, "invoice": "2026-117"},
                }
                async with s.post("/approvals", json=body) as resp:
                    assert resp.status == 201, await resp.text()
                    ids.append((await resp.json())["id"])

        await asyncio.gather(*(make(n // 10 + (i < n % 10)) for i in range(10)))
    return token, sorted(ids)


async def first_screen(page: Any, base: str, loads: int, report: Report) -> None:
    ready: list[float] = []
    fetched: list[float] = []
    await page.goto(base + "/console#/pending")
    for _ in range(loads):
        await page.reload()  # a whole load: the page, its script, the first page of the list
        await page.wait_for_selector("body[data-ready='1']")
        rows = await page.locator("#pending .approval-row").count()
        assert rows == 50, rows
        mark, request = await page.evaluate(
            """() => {
                const mark = performance.getEntriesByName("jarvisd:pending-ready")[0];
                const list = performance.getEntriesByType("resource")
                    .filter(e => e.name.includes("/approvals?") && e.name.includes("pending"))[0];
                return [mark.startTime, list ? list.responseEnd - list.startTime : null];
            }"""
        )
        ready.append(mark)
        if request is not None:
            fetched.append(request)
    print(f"first screen: {loads} loads of /console with 1 page of 50 shown")
    for what, q in STATS:
        value = pct(ready, q)
        report.add(
            f"first screen usable {what}",
            value,
            "ms",
            floor=pct(fetched, q),
            floor_name=f"its first page's GET {what}",
            note=f"target < 300 ms: {'met' if value < 300 else 'NOT met'}"
            if what == "max"
            else None,
        )


async def decisions(page: Any, base: str, requester: str, ids: list[int], report: Report) -> None:
    reader = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.console",
        "--hold",
        base,
        "--token",
        requester,
        "--ids",
        ",".join(map(str, ids)),
        stdout=asyncio.subprocess.PIPE,
    )
    assert reader.stdout is not None
    assert (await reader.stdout.readline()).strip() == b"ready"
    async with aiohttp.ClientSession() as s, asyncio.timeout(60):
        while True:  # every long-poll in and waiting
            async with s.get(base + "/stats") as resp:
                stats = await resp.json()
            if stats["actors"]["approvals"]["approvals"]["waiting"] >= len(ids):
                break
            await asyncio.sleep(0.1)
    # When the person clicks, on the wall clock (ms since the epoch).
    await page.evaluate(
        """() => document.addEventListener("click", (e) => {
            if (e.target.id === "approve") {
                window.clickedAt = Date.now() - (performance.now() - e.timeStamp);
            }
        }, true)"""
    )
    clicked: dict[int, float] = {}
    sent: dict[int, float] = {}  # the page's PUT: sent, and its answer read
    replied: dict[int, float] = {}
    round_trip: list[float] = []
    for approval_id in ids:
        await page.evaluate("id => { location.hash = '#/approvals/' + id; }", approval_id)
        await page.locator("#detail-status").filter(has_text="pending").wait_for()
        await expect(page.locator("#approve")).to_be_enabled()
        await page.evaluate("() => performance.clearResourceTimings()")
        await page.click("#approve")
        clicked[approval_id] = await page.evaluate("() => window.clickedAt") / 1000
        await page.locator("#detail-status").filter(has_text="approved").wait_for()
        put = await page.evaluate(
            """id => {
                const e = performance.getEntriesByType("resource")
                    .filter(r => r.name.endsWith("/approvals/" + id + "/approve"))[0];
                const wall = Date.now() - performance.now();  // the wall clock at 0
                return e ? [wall + e.startTime, wall + e.responseEnd] : null;
            }""",
            approval_id,
        )
        if put is not None:
            sent[approval_id], replied[approval_id] = put[0] / 1000, put[1] / 1000
            round_trip.append(put[1] - put[0])
    out, _ = await reader.communicate()
    assert reader.returncode == 0, "the agents' long-polls failed"
    answered = {int(k): v for k, v in json.loads(out.decode().splitlines()[-1]).items()}
    reached = [(answered[i] - clicked[i]) * 1000 for i in ids]
    to_send = [(sent[i] - clicked[i]) * 1000 for i in sent]
    after = [(answered[i] - replied[i]) * 1000 for i in replied]
    print(f"{len(ids)} decisions clicked on the page, each with an agent on the long-poll")
    for what, q in STATS:
        value = pct(reached, q)
        report.add(
            f"click on the page→agent answered {what}",
            value,
            "ms",
            floor=pct(round_trip, q),
            floor_name=f"the page's PUT round trip {what}",
            note=f"target p99 < 50 ms: {'met' if value < 50 else 'NOT met'}"
            if what == "p99"
            else None,
        )
    for what, q in STATS:
        report.add(f"click→the page's PUT sent {what}", pct(to_send, q), "ms")
    for what, q in STATS:
        report.add(f"the page read the PUT's answer→agent answered {what}", pct(after, q), "ms")


async def run(pg: str, redis_url: str, args: argparse.Namespace, report: Report) -> None:
    path = browser_path()
    if path is None:
        raise SystemExit("no Chromium found: apt-get install chromium, or set JARVISD_TEST_BROWSER")
    # One agent holds a long-poll per decision.
    waiters = str(max(args.decisions, 100))
    async with bench_daemon(pg, redis_url, APPROVALS__MAX_WAITERS_PER_PRINCIPAL=waiters) as d:
        requester, ids = await setup(d.base, d.token, args.pending)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=path, headless=True, args=CHROMIUM_ARGS
            )
            try:
                page = await (await browser.new_context()).new_page()
                await page.goto(d.base + "/console")
                await page.fill("#username", "approver")
                await page.fill("#password", PASSWORD)
                await page.keyboard.press("Enter")
                await page.wait_for_selector("body[data-ready='1']")
                await first_screen(page, d.base, args.loads, report)
                await decisions(page, d.base, requester, ids[: args.decisions], report)
            finally:
                await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pending", type=int, default=1000)
    parser.add_argument("--decisions", type=int, default=200)
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--hold", help=argparse.SUPPRESS)  # the reader process
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold:
        ids = [int(i) for i in args.ids.split(",")]
        answered = asyncio.run(hold_waiters(args.hold, args.token, ids, clock=time.time))
        print(json.dumps(answered))
        return
    run_bench(
        "console",
        args.json,
        lambda servers, report: run(servers.postgres_dsn, servers.redis_url, args, report),
    )


if __name__ == "__main__":
    main()
