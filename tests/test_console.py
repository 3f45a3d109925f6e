"""The approvals console in a real headless Chromium, against an in-process
daemon on real PostgreSQL and Redis: a person logs in, sees requests arrive
live, reads everything about one and decides it, as an agent waits on the
long-poll. Each state is kept as a screenshot (``tests/browser.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from config import LoadedConfig
from jarvisd.http.console import CSP
from tests.browser import artifacts, chromium
from tests.test_api import Api, serve_api
from tests.test_approvals import command_of
from tests.test_bus import BUS, requested

if os.environ.get("JARVISD_TEST_BROWSER_REQUIRED") != "1":
    pytest.importorskip("playwright.async_api", reason="Playwright is not installed")
from playwright.async_api import expect

PASSWORD = "a long enough password"


@pytest.fixture
def console_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def api(
    make_config: Callable[..., LoadedConfig], console_overrides: dict[str, Any]
) -> AsyncIterator[Api]:
    loaded = make_config(
        bus=BUS, approvals={"default_score": 0, "sweep_interval": 0.2, **console_overrides}
    )
    async for client in serve_api(loaded):
        yield client


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


class Person:
    """One person at the console, in a browser context of their own."""

    def __init__(self, page: Any, name: str, shots: Path) -> None:
        self.page = page
        self.name = name
        self.shots = shots
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on(
            "console",
            lambda msg: (
                self.errors.append(msg.text)
                if msg.type == "error" and "Content Security Policy" in msg.text
                else None
            ),
        )

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    async def shot(self, name: str) -> None:
        await self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    async def open_detail(self, approval_id: int) -> None:
        await self.page.click(f'#pending [data-approval-id="{approval_id}"]')
        await self.page.wait_for_selector("#detail:not([hidden])")
        await expect(self.page).to_have_url(re.compile(f"#/approvals/{approval_id}$"))


class Gate:
    """The page's WebSocket, passed through to the daemon while open; shut,
    it drops the connection and refuses new ones (a network gone away)."""

    def __init__(self) -> None:
        self.open = True
        self.sockets: list[Any] = []
        self.sent: list[dict[str, Any]] = []  # what the page sent

    async def install(self, page: Any) -> None:
        await page.route_web_socket(re.compile(r"/ws$"), self._route)

    async def _route(self, ws: Any) -> None:
        if not self.open:
            await ws.close(code=1001, reason="gone")
            return
        server = ws.connect_to_server()
        ws.on_message(lambda m: (self.sent.append(json.loads(m)), server.send(m)))
        self.sockets.append(ws)

    async def shut(self) -> None:
        self.open = False
        for ws in self.sockets:
            await ws.close(code=1001, reason="gone")
        self.sockets.clear()


async def log_in(
    browser: Any,
    api: Api,
    username: str,
    role: str,
    shots: Path,
    *,
    mobile: bool = False,
    gate: Gate | None = None,
) -> Person:
    await api.user(username, role, password=PASSWORD)
    options: dict[str, Any] = {"viewport": {"width": 1280, "height": 900}}
    if mobile:
        options = {"viewport": {"width": 390, "height": 844}, "is_mobile": True}
    context = await browser.new_context(**options)
    page = await context.new_page()
    if gate is not None:
        await gate.install(page)
    person = Person(page, username, shots)
    await page.goto(api.base + "/console")
    await page.fill("#username", username)
    await page.fill("#password", PASSWORD)
    await page.keyboard.press("Enter")  # the keyboard submits the form
    await page.wait_for_selector("#app:not([hidden])")
    await page.wait_for_selector("body[data-ready='1']")
    return person


async def row_texts(page: Any, where: str = "#pending") -> list[str]:
    return [t.strip() for t in await page.locator(f"{where} .approval-row").all_inner_texts()]


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    return artifacts(tmp_path)


async def test_the_console_is_served_with_a_strict_policy_and_a_browser_is_sent_to_it(
    api: Api,
) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/console", "/console/console.js", "/console/console.css"):
            async with s.get(api.base + path) as resp:
                assert resp.status == 200, path
                assert resp.headers["Content-Security-Policy"] == CSP
                assert resp.headers["X-Frame-Options"] == "DENY"
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                assert "Set-Cookie" not in resp.headers
                etag = resp.headers["ETag"]
            async with s.get(api.base + path, headers={"If-None-Match": etag}) as again:
                assert again.status == 304
        async with s.get(api.base + "/console") as resp:
            page = await resp.text()
        assert "<script" not in page.replace('<script src="/console/console.js" defer>', "")
        assert api.r.daemon.settings.redis.prefix in page  # the channel prefix, for the socket
        async with s.get(
            api.base + "/", headers={"Accept": "text/html"}, allow_redirects=False
        ) as resp:
            assert (resp.status, resp.headers["Location"]) == (303, "/console")
        async with s.get(api.base + "/console/approvals/12", allow_redirects=False) as resp:
            assert (resp.status, resp.headers["Location"]) == (303, "/console#/approvals/12")
        for odd in ("x1", "%C2%B2", "%D9%A1%D9%A2", "1" * 19, "-1"):
            async with s.get(api.base + f"/console/approvals/{odd}", allow_redirects=False) as resp:
                assert resp.status == 404, odd


async def test_log_in_see_a_request_arrive_live_approve_it_and_the_agent_hears(
    api: Api, raw: aioredis.Redis, browser: Any, shots: Path
) -> None:
    agent_id, agent = await api.user("mailer", "agent")
    page_error = await browser.new_context()
    bad = await page_error.new_page()
    await bad.goto(api.base + "/console")
    await bad.fill("#username", "nobody")
    await bad.fill("#password", "wrong password")
    await bad.keyboard.press("Enter")
    await bad.wait_for_selector("#login-error:not(:empty)")
    assert "wrong username or password" in await bad.inner_text("#login-error")
    await bad.screenshot(path=str(shots / "01-login-refused.png"))
    await page_error.close()

    ann = await log_in(browser, api, "ann", "approver", shots)
    assert await ann.page.inner_text("#who") == "ann (approver)"
    await expect(ann.page.locator("#live")).to_have_text("live")
    assert "Nothing waits" in await ann.page.inner_text("#pending")
    await ann.shot("02-empty")

    # An agent asks on the inbox: the request appears without a reload.
    await raw.xadd(
        api.r.daemon.settings.inbox,
        {
            "envelope": requested(
                "live-1",
                user_id=agent_id,
                action="delete_file",
                parameters={"path": "/srv/old.log"},
                description="free some space",
            )
        },
    )
    command = await command_of(api, agent, "live-1")
    aid = command["approvalId"]
    await ann.page.wait_for_selector(f'#pending [data-approval-id="{aid}"]', timeout=10_000)
    assert "delete_file" in (await row_texts(ann.page))[0]
    assert await ann.page.inner_text("#pending-count") == "1 pending"
    await ann.shot("03-arrived")

    await ann.open_detail(aid)
    detail = await ann.page.inner_text("#detail")
    for shown in ("delete_file", "free some space", "HIGH", 'rule "delete*"', "mailer", "inbox"):
        assert shown in detail, shown
    assert json.loads(await ann.page.inner_text("#detail-parameters")) == {"path": "/srv/old.log"}
    history = ann.page.locator("#detail-history tbody tr")
    await expect(history.first).to_contain_text("pending")
    assert await history.count() == 2  # the command's creation and the request's
    await ann.shot("04-detail")

    # The agent waits on the long-poll; the person approves with a reason.
    poll = asyncio.create_task(api.call("GET", f"/approvals/{aid}?wait=30", token=agent))
    await asyncio.sleep(0.3)
    assert not poll.done()
    await ann.page.fill("#reason", "old logs only")
    await ann.page.click("#approve")
    code, _h, polled = await asyncio.wait_for(poll, 10)
    assert (code, polled["status"], polled["decider"], polled["reason"]) == (
        200,
        "approved",
        "ann",
        "old logs only",
    )
    await expect(ann.page.locator("#detail-status")).to_contain_text(re.compile("approved", re.I))
    await ann.page.wait_for_selector(f'#pending [data-approval-id="{aid}"]', state="detached")
    await ann.shot("05-approved")
    assert ann.errors == []


async def test_reject_needs_a_reason_and_the_history_shows_it(
    api: Api, browser: Any, shots: Path
) -> None:
    _r, requester = await api.user("rob")
    _, _, cmd = await api.call(
        "POST",
        "/commands",
        token=requester,
        json={"action": "transfer_money", "parameters": {"eur": 900}},
    )
    aid = cmd["approvalId"]
    pia = await log_in(browser, api, "pia", "approver", shots, mobile=True)
    await pia.page.wait_for_selector(f'#pending [data-approval-id="{aid}"]')
    await pia.shot("06-phone-list")
    await pia.open_detail(aid)
    await pia.page.click("#reject")  # no reason: refused on the page, nothing sent
    await pia.page.wait_for_selector("#outcome:not(:empty)")
    assert "reason" in (await pia.page.inner_text("#outcome")).lower()
    _s, _h, still = await api.call("GET", f"/approvals/{aid}", token=requester)
    assert still["status"] == "pending"
    await pia.page.fill("#reason", "not this month")
    await pia.page.click("#reject")
    await expect(pia.page.locator("#detail-status")).to_contain_text(re.compile("rejected", re.I))
    _s, _h, done = await api.call("GET", f"/approvals/{aid}", token=requester)
    assert (done["status"], done["reason"], done["decider"]) == (
        "rejected",
        "not this month",
        "pia",
    )
    await pia.shot("07-phone-rejected")
    # The page fits the phone: nothing wider than the screen.
    width = await pia.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    # History: decided requests, filtered.
    await pia.page.goto(api.base + "/console#/history")
    await pia.page.wait_for_selector("#history .approval-row")
    assert "transfer_money" in " ".join(await row_texts(pia.page, "#history"))
    assert pia.errors == []


@pytest.mark.parametrize("console_overrides", [{"expiry": 2, "warn_before": 1}])
async def test_an_expired_request_leaves_the_list_and_says_so(
    api: Api, browser: Any, shots: Path
) -> None:
    _r, requester = await api.user("ivy")
    ed = await log_in(browser, api, "ed", "approver", shots)
    _, _, cmd = await api.call("POST", "/commands", token=requester, json={"action": "pay_bill"})
    aid = cmd["approvalId"]
    await ed.page.wait_for_selector(f'#pending [data-approval-id="{aid}"]')
    await ed.open_detail(aid)
    await expect(ed.page.locator("#detail-status")).to_contain_text(
        re.compile("expired", re.I), timeout=15_000
    )
    await ed.page.wait_for_selector(f'#pending [data-approval-id="{aid}"]', state="detached")
    assert await ed.page.is_disabled("#approve") or not await ed.page.is_visible("#approve")
    await ed.shot("08-expired")


@pytest.mark.parametrize("console_overrides", [{"quorum": {"HIGH": {"approvals": 2}}}])
async def test_a_quorum_request_waits_for_a_second_approver_and_a_race_is_explained(
    api: Api, browser: Any, shots: Path
) -> None:
    _r, requester = await api.user("quinn")
    ann = await log_in(browser, api, "ann", "approver", shots)
    ben = await log_in(browser, api, "ben", "approver", shots)
    cat = await log_in(browser, api, "cat", "approver", shots)
    _, _, cmd = await api.call("POST", "/commands", token=requester, json={"action": "pay_rent"})
    aid = cmd["approvalId"]
    for person in (ann, ben, cat):
        await person.page.wait_for_selector(f'#pending [data-approval-id="{aid}"]')
        await person.open_detail(aid)
    await ann.page.click("#approve")
    await expect(ann.page.locator("#outcome")).to_contain_text("1 of 2")
    _s, _h, half = await api.call("GET", f"/approvals/{aid}", token=requester)
    assert (half["status"], [v["by"] for v in half["approvals"]]) == ("pending", ["ann"])
    # The others see the first approval without a reload.
    await expect(ben.page.locator("#detail-approvals")).to_contain_text("ann")
    await ben.shot("09-quorum-one-of-two")
    # Two people decide at once: one wins, the other is told why.
    # Both buttons pressed in the same moment (a click by the page's own
    # script: no wait for the button to settle, which a decision arriving
    # over the socket could disable first).
    press = "() => document.getElementById('approve').click()"
    await asyncio.gather(ben.page.evaluate(press), cat.page.evaluate(press))
    # A click returns once dispatched: the decisions land a little later.
    _s, _h, final = await api.call("GET", f"/approvals/{aid}?wait=10", token=requester)
    assert final["status"] == "approved"
    assert len(final["approvals"]) == 2
    winner, loser = (ben, cat) if final["decider"] == "ben" else (cat, ben)
    await expect(loser.page.locator("#outcome")).to_contain_text("Already decided")
    explained = await loser.page.inner_text("#outcome")
    assert "approved" in explained
    assert winner.name in explained
    await loser.shot("10-race-lost")
    await winner.shot("11-race-won")


async def test_agent_written_markup_is_shown_as_text_and_never_runs(
    api: Api, browser: Any, shots: Path
) -> None:
    _r, requester = await api.user("mallory")
    attack = {
        "path": "<img src=x onerror=alert(1)>",
        "html": "</pre><script>alert(2)</script>",
        "url": "javascript:alert(3)",
    }
    _, _, cmd = await api.call(
        "POST",
        "/commands",
        token=requester,
        json={
            "action": "delete_file",
            "description": "<svg onload=alert(4)> \u202egnp.exe",
            "parameters": attack,
        },
    )
    aid = cmd["approvalId"]
    vic = await log_in(browser, api, "victor", "approver", shots)
    await vic.page.wait_for_selector(f'#pending [data-approval-id="{aid}"]')
    # From the keyboard: the row takes the focus, Enter opens it.
    await vic.page.focus(f'#pending [data-approval-id="{aid}"]')
    await vic.page.keyboard.press("Enter")
    await vic.page.wait_for_selector("#detail-body:not([hidden])")  # read, not loading
    assert json.loads(await vic.page.inner_text("#detail-parameters")) == attack
    assert "<svg onload=alert(4)> \\u202egnp.exe" in await vic.page.inner_text("#detail")
    assert await vic.page.locator("#app img, #app script, #app svg").count() == 0
    await asyncio.sleep(0.5)
    assert vic.dialogs == []  # nothing ran
    await vic.shot("12-markup-as-text")
    await vic.page.keyboard.press("Escape")  # back to the list, on the same row
    await vic.page.wait_for_selector("#detail", state="hidden")
    focused = await vic.page.evaluate("document.activeElement.dataset.approvalId")
    assert focused == str(aid)


async def test_after_a_disconnect_the_list_resumes_with_what_it_missed(
    api: Api, raw: aioredis.Redis, browser: Any, shots: Path
) -> None:
    agent_id, agent = await api.user("resumer", "agent")
    gate = Gate()
    ann = await log_in(browser, api, "ann", "approver", shots, gate=gate)
    await expect(ann.page.locator("#live")).to_have_text("live")
    await raw.xadd(
        api.r.daemon.settings.inbox,
        {"envelope": requested("seen-1", user_id=agent_id, action="delete_file")},
    )
    seen = (await command_of(api, agent, "seen-1"))["approvalId"]
    await ann.page.wait_for_selector(f'#pending [data-approval-id="{seen}"]')
    # The connection drops, and stays down a while: the page says so.
    await gate.shut()
    await expect(ann.page.locator("#live")).not_to_have_text("live")
    # Asked while the page is away: it learns of it from the event log (since).
    await raw.xadd(
        api.r.daemon.settings.inbox,
        {"envelope": requested("missed-1", user_id=agent_id, action="delete_file")},
    )
    aid = (await command_of(api, agent, "missed-1"))["approvalId"]
    await asyncio.sleep(0.5)
    assert await ann.page.locator(f'#pending [data-approval-id="{aid}"]').count() == 0
    gate.open = True
    await ann.page.wait_for_selector(f'#pending [data-approval-id="{aid}"]', timeout=30_000)
    await expect(ann.page.locator("#live")).to_have_text("live")
    subscribes = [f for f in gate.sent if f["op"] == "subscribe"]
    assert "since" not in subscribes[0]
    assert subscribes[-1]["since"] >= 1  # resumed from the last event it had
    await ann.shot("13-resumed")
