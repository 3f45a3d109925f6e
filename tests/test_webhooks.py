"""Webhooks: every matching event from the outbox to each endpoint, signed,
in id order, at least once; a dead endpoint is visible and retryable; a
slow one holds up nobody else. The endpoints are aiohttp servers here."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from aiohttp import web

from actors.outbox.hooks import sign, slack_text, verify
from config import ConfigError, LoadedConfig, WebhookSettings, load_settings, redacted, to_toml
from tests.test_api import Api, serve_api

SECRET = "a-webhook-secret-of-some-length"


class Receiver:
    """An endpoint: records what it is sent; ``mode`` says how it answers."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.got: list[dict[str, Any]] = []  # every request, in arrival order
        self.mode = "ok"  # ok, fail (500), slow (sleeps), down (the listener is closed)
        self.slow = 3.0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append(
            {
                "body": json.loads(body),
                "signed": verify(self.secret, body, request.headers.get("Jarvisd-Signature", "")),
                "id": request.headers.get("Jarvisd-Event-Id"),
                "type": request.headers.get("Jarvisd-Event-Type"),
                "at": time.monotonic(),
            }
        )
        if self.mode == "slowfail":
            await asyncio.sleep(self.slow)
        if self.mode in ("fail", "slowfail"):
            return web.Response(status=500, text="broken")
        if self.mode == "slow":
            await asyncio.sleep(self.slow)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.mode = "ok"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.mode = "down"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def ids(self) -> list[int]:
        return [int(g["id"]) for g in self.got if g["id"]]

    async def until(self, count: int, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while len(self.got) < count:
                await asyncio.sleep(0.02)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def hook(name: str, url: str, **options: Any) -> WebhookSettings:
    return msgspec.convert({"name": name, "url": url, "secret": SECRET, **options}, WebhookSettings)


async def serve_with(
    make_config: Callable[..., LoadedConfig], *hooks: WebhookSettings
) -> AsyncIterator[Api]:
    loaded = make_config(events={"poll_interval": 0.2})
    settings = msgspec.structs.replace(loaded.settings, webhooks=hooks)
    async for client in serve_api(LoadedConfig(settings=settings, path=None)):
        # A new endpoint starts with the events after it is first seen: wait for that.
        async with asyncio.timeout(10):
            while True:
                status, _h, listed = await client.call("GET", "/webhooks", local=True)
                assert status == 200, listed
                if all(h["state"] != "new" for h in listed):
                    break
                await asyncio.sleep(0.05)
        yield client


async def commands(api: Api, token: str, n: int, prefix: str = "note") -> None:
    for i in range(n):
        status, _h, made = await api.call(
            "POST", "/commands", token=token, json={"action": f"{prefix}_{i}"}
        )
        assert status == 201, made


async def outbox_ids(dsn: str) -> list[int]:
    db = await asyncpg.connect(dsn)
    try:
        return [r["id"] for r in await db.fetch("SELECT id FROM events ORDER BY id")]
    finally:
        await db.close()


async def listed(api: Api, name: str) -> dict[str, Any]:
    status, _h, hooks = await api.call("GET", "/webhooks", local=True)
    assert status == 200
    return next(h for h in hooks if h["name"] == name)


async def state_is(api: Api, name: str, state: str, timeout: float = 15) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while (found := await listed(api, name))["state"] != state:
            await asyncio.sleep(0.05)
    return found


# -- a receiver down for 30 s --------------------------------------------------------------------
@pytest.mark.slow  # 30 s of outage: once per CI run
async def test_a_receiver_down_for_30_s_then_back_gets_every_event_once_in_order_signed(
    make_config: Callable[..., LoadedConfig], receiver: Receiver, pg_dsn: str
) -> None:
    h = hook("ops", receiver.url, backoff=0.2, backoff_max=2.0, max_attempts=1000)
    async for api in serve_with(make_config, h):
        _uid, token = await api.user("busy")
        await commands(api, token, 5, "before")
        await receiver.until(5)
        await receiver.stop()
        down_at = time.monotonic()
        await commands(api, token, 20, "while_down")
        found = await state_is(api, "ops", "retrying")
        assert found["lastError"].startswith("ClientConnectorError")
        await asyncio.sleep(30 - (time.monotonic() - down_at))
        await receiver.start()
        await commands(api, token, 5, "after")
        await receiver.until(30, timeout=30)
        await asyncio.sleep(0.5)  # nothing more comes
        ids = await outbox_ids(pg_dsn)
        assert receiver.ids() == ids  # every event once, in id order
        assert all(g["signed"] for g in receiver.got)
        assert [g["body"]["id"] for g in receiver.got] == [str(i) for i in ids]
        actions = [g["body"]["data"]["action"] for g in receiver.got]
        assert actions[5:25] == [f"while_down_{i}" for i in range(20)]
        done = await state_is(api, "ops", "live")
        assert done["delivered"] == 30
        assert done["lastId"] == ids[-1]
        assert done["failures"] >= 3


# -- always failing: dead, visible, retryable ---------------------------------------------------
async def test_an_endpoint_that_always_fails_ends_dead_visible_and_retryable(
    make_config: Callable[..., LoadedConfig], receiver: Receiver, tmp_path: Path, pg_dsn: str
) -> None:
    receiver.mode = "fail"
    h = hook("broken", receiver.url, backoff=0.05, backoff_max=0.1, max_attempts=3)
    async for api in serve_with(make_config, h):
        _uid, token = await api.user("hopeful")
        await commands(api, token, 3)
        dead = await state_is(api, "broken", "dead")
        assert dead["attempts"] == 3
        assert dead["failures"] == 3
        assert dead["lastStatus"] == 500
        assert dead["lastError"] == "HTTP 500 Internal Server Error"
        assert len(receiver.got) == 3  # the first event, three times; then nothing
        assert {g["id"] for g in receiver.got} == {str((await outbox_ids(pg_dsn))[0])}
        # Visible: /stats, /metrics, health, the CLI.
        status, _h, stats = await api.call("GET", "/stats", local=True)
        assert status == 200
        shown = stats["actors"]["webhooks"]["webhooks"]["endpoints"][0]
        assert shown["name"] == "broken"
        assert shown["state"] == "dead"
        assert "url" not in shown  # /stats may be open: no URL, no error text there
        assert "lastError" not in shown
        metrics = (await api.r.get("/metrics"))[2]
        assert 'jarvisd_webhook_dead{webhook="broken"} 1' in metrics
        assert 'jarvisd_webhook_failures_total{webhook="broken"} 3' in metrics
        async with asyncio.timeout(5):  # at the next health check
            while (ready := (await api.r.json("/health/ready"))[1])["checks"]["webhooks"][0][
                "status"
            ] != "warn":
                await asyncio.sleep(0.05)
        assert "broken" in ready["checks"]["webhooks"][0]["output"]
        config = tmp_path / "cli.toml"
        ours = api.r.daemon.settings
        config.write_text(
            f'[http]\nunix_socket = "{ours.http.unix_socket}"\n'
            f'[postgres]\ndsn = "{pg_dsn}"\n[redis]\nurl = "{ours.redis.url}"\n'
        )
        out = await run_cli(config, "webhooks", "list")
        assert out.returncode == 0, out.stderr
        assert "broken" in out.stdout
        assert "dead" in out.stdout
        assert "HTTP 500" in out.stdout
        # Retryable: the receiver mends, retry, and everything comes in order.
        receiver.mode = "ok"
        receiver.got.clear()
        out = await run_cli(config, "webhooks", "retry", "broken")
        assert out.returncode == 0, out.stderr
        await receiver.until(3)
        assert receiver.ids() == await outbox_ids(pg_dsn)
        live = await state_is(api, "broken", "live")
        assert live["delivered"] == 3
        assert live["attempts"] == 0
        gone = await run_cli(config, "webhooks", "retry", "nosuch")
        assert gone.returncode == 1
        assert "no webhook 'nosuch'" in gone.stderr


async def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVISD_")}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "jarvisd", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


async def test_an_endpoint_whose_every_attempt_raises_ends_dead_and_the_daemon_runs_on(
    make_config: Callable[..., LoadedConfig],
) -> None:
    """A URL the config would refuse (an empty host label), given anyway:
    every attempt raises inside the HTTP client. The endpoint ends dead; the
    actor and the daemon never crash."""
    h = hook("odd", "http://hooks..example.com/x", backoff=0.05, backoff_max=0.1, max_attempts=3)
    async for api in serve_with(make_config, h):
        _uid, token = await api.user("odd")
        await commands(api, token, 2)
        dead = await state_is(api, "odd", "dead")
        assert dead["failures"] == 3
        assert "Error" in dead["lastError"]
        assert api.r.daemon.actors.webhooks.stats.crashes == 0
        status, _h, _b = await api.call("POST", "/commands", token=token, json={"action": "x"})
        assert status == 201


async def test_a_retry_asked_for_during_an_attempt_is_not_lost(
    make_config: Callable[..., LoadedConfig], receiver: Receiver
) -> None:
    receiver.mode, receiver.slow = "slowfail", 0.8
    h = hook("flaky", receiver.url, backoff=0.05, backoff_max=0.1, max_attempts=2)
    async for api in serve_with(make_config, h):
        _uid, token = await api.user("impatient")
        await commands(api, token, 1)
        await receiver.until(2)  # the second attempt is in flight
        status, _h, _b = await api.call("POST", "/webhooks/flaky/retry", local=True)
        assert status == 200
        dead = await state_is(api, "flaky", "dead")
        assert dead["failures"] == 3  # the retry counted afresh: one more attempt
        assert len(receiver.got) == 3


async def test_only_admins_see_or_retry_webhooks(
    make_config: Callable[..., LoadedConfig], receiver: Receiver
) -> None:
    async for api in serve_with(make_config, hook("ops", receiver.url)):
        for role in ("user", "approver", "agent"):
            _uid, token = await api.user(f"a_{role}", role=role)
            status, _h, _b = await api.call("GET", "/webhooks", token=token)
            assert status == 403
            status, _h, _b = await api.call("POST", "/webhooks/ops/retry", token=token)
            assert status == 403
        status, _h, _b = await api.call("POST", "/webhooks/nosuch/retry", local=True)
        assert status == 404
        status, _h, _b = await api.call("POST", "/webhooks/..%2Fx/retry", local=True)
        assert status == 404


# -- a slow endpoint delays nobody ----------------------------------------------------------------
async def test_a_slow_endpoint_delays_neither_the_daemon_nor_another_endpoint(
    make_config: Callable[..., LoadedConfig], receiver: Receiver
) -> None:
    slow = Receiver()
    await slow.start()
    slow.mode, slow.slow = "slow", 5.0
    try:
        hooks = (hook("slow", slow.url, timeout=30), hook("quick", receiver.url))
        async for api in serve_with(make_config, *hooks):
            _uid, token = await api.user("rushed")
            started = time.monotonic()
            await commands(api, token, 4)
            assert time.monotonic() - started < 2  # the daemon takes commands as ever
            await receiver.until(4, timeout=3)
            assert len(slow.got) == 1  # still on its first
            assert receiver.ids() == sorted(receiver.ids())
    finally:
        slow.mode = "ok"
        await slow.stop()


# -- types and formats ---------------------------------------------------------------------------
async def test_an_endpoint_gets_only_its_types_and_slack_gets_text_with_a_link(
    make_config: Callable[..., LoadedConfig], receiver: Receiver
) -> None:
    h = hook(
        "slack",
        receiver.url,
        format="slack",
        types=["approval.requested"],
        link_base="https://jarvis.example",
    )
    async for api in serve_with(make_config, h):
        _uid, token = await api.user("asker")
        await commands(api, token, 2)  # command.created: not for this endpoint
        status, _h, made = await api.call(
            "POST",
            "/commands",
            token=token,
            json={"action": "delete_files", "description": "clean <!channel> & <https://x|go>"},
        )
        assert status == 201, made
        assert made["status"] == "awaiting_approval", made
        await receiver.until(1)
        await asyncio.sleep(0.3)
        assert len(receiver.got) == 1
        got = receiver.got[0]
        assert got["type"] == "approval.requested"
        assert got["signed"]
        text = got["body"]["text"]
        approval = made["approvalId"]
        assert f"<https://jarvis.example/approvals/{approval}|request #{approval}>" in text
        assert "*delete_files*" in text
        quoted = next(line for line in text.splitlines() if line.startswith("> "))
        assert quoted.startswith("> `clean ")
        assert quoted.endswith("`")
        assert "&lt;!channel&gt;" in text  # no mention, no link an agent can make
        assert "&lt;https://x|go&gt;" in text
        assert " &amp; " in text
        assert "Risk " in text


def test_signatures_are_over_the_timestamp_and_the_body() -> None:
    body = b'{"v":1,"id":"7"}'
    header = sign(SECRET, body)
    assert verify(SECRET, body, header)
    assert not verify(SECRET, body + b" ", header)
    assert not verify("another-secret-of-some-length", body, header)
    old = sign(SECRET, body, at=int(time.time()) - 3600)
    assert not verify(SECRET, body, old)  # a replay, an hour late
    assert not verify(SECRET, body, "v1=deadbeef")
    text = slack_text(
        {
            "type": "approval.decided",
            "data": {"approvalId": 4, "decision": "approved", "decider": "ana"},
        },
        "http://h:1",
    )
    assert text == "<http://h:1/approvals/4|request #4> was approved by `ana`"
    vote = {"approvalId": 4, "by": "<!channel>", "approvals": 1, "approvalsRequired": 2}
    text = slack_text({"type": "approval.vote", "data": vote}, "http://h:1")
    assert text == "<http://h:1/approvals/4|request #4> approved by `&lt;!channel&gt;` (1 of 2)"
    escalated = {
        "approvalId": 5,
        "action": "pay_rent",
        "riskScore": 85,
        "riskCategory": "HIGH",
        "requester": "rita",
        "approvals": 1,
        "approvalsRequired": 2,
        "description": "rent\n@here",
        "expiresAt": "2026-11-30T06:00:00Z",
    }
    text = slack_text({"type": "approval.escalated", "data": escalated}, "http://h:1")
    assert text.splitlines() == [
        ":rotating_light: Escalated, no decision yet: *pay_rent*",
        "Risk 85/100 (HIGH), asked by `rita`, 1 of 2 approvals",
        "> `rent @here`",
        "Decide: <http://h:1/approvals/5|request #5> before 2026-11-30T06:00:00Z",
    ]


# -- configuration -------------------------------------------------------------------------------
def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jarvisd.toml"
    path.write_text('[postgres]\ndsn = "postgresql://j@db/j"\n[redis]\nurl = "redis://r"\n' + text)
    return path


def test_webhooks_are_read_with_their_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "ops.secret").write_text(SECRET + "\n")
    path = write(
        tmp_path,
        '[[webhooks]]\nname = "ops"\nurl = "https://hooks.example/a/b"\n'
        'types = ["approval.*"]\nsecret_file = "ops.secret"\n\n'
        '[[webhooks]]\nname = "chat"\nurl = "https://chat.example/services/T0/B0/xyz"\n'
        'format = "slack"\n',
    )
    settings = load_settings(path, env={}).settings
    ops, chat = settings.webhooks
    assert ops.secret == SECRET
    assert ops.types == ("approval.*",)
    assert ops.secret_file == str(tmp_path / "ops.secret")
    assert chat.format == "slack"
    assert chat.secret == ""
    shown = to_toml(redacted(settings))
    assert SECRET not in shown
    assert "xyz" not in shown
    assert '[[webhooks]]\nname = "ops"' in shown


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('url = "https://h/x"\nsecret = "s"', "webhooks[0].secret", "put the secret in a file"),
        ('url = "https://h/x"', "webhooks.a.secret_file", "required"),
        ('url = "ftp://h/x"\nformat = "slack"', "webhooks.a.url", "expected an http"),
        ('url = "https://h/x"\nsecret_file = "short"', "webhooks.a.secret_file", "at least 16"),
        ('url = "https://h/x"\nsecret_file = "nope"', "webhooks.a.secret_file", "cannot read"),
        ('url = "https://h/x"\nformat = "teams"', "webhooks[0].format", "one of"),
        ('url = "https://h/x"\ntypes = []', "webhooks[0].types", "at least 1"),
        ('url = "https://h/x"\nmax_attempts = 0', "webhooks[0].max_attempts", "at least 1"),
        ('url = "http://hooks..example.com/x"', "webhooks.a.url", "not a valid host name"),
        ('url = "http://[fe80::1/hook"', "webhooks.a.url", "expected an http"),
        ('url = "http://h:99999/x"', "webhooks.a.url", "expected an http"),
        ('url = "https://h/x"\nsecret_file = "binary"', "webhooks.a.secret_file", "not UTF-8"),
    ],
)
def test_a_webhook_misconfigured_is_refused_in_words(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    (tmp_path / "short").write_text("tooshort")
    (tmp_path / "binary").write_bytes(bytes(range(128, 160)))
    path = write(tmp_path, f'[[webhooks]]\nname = "a"\n{text}\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    issues = {i.key: i.message for i in err.value.issues}
    assert key in issues, issues
    assert problem in issues[key]


def test_webhook_names_are_unique_and_only_in_the_file(tmp_path: Path) -> None:
    entry = '[[webhooks]]\nname = "a"\nurl = "https://h/x"\nformat = "slack"\n'
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, entry + entry), env={})
    assert "two webhooks have this name" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, entry), env={"JARVISD_WEBHOOKS__URL": "https://h"})
    assert "config file only" in str(err.value)


def test_a_webhook_url_is_shown_as_its_host_alone() -> None:
    from config.webhooks import shown_url

    assert shown_url("https://u:pw@hooks.example:8443/T0/B0/xyz?token=s") == (
        "https://hooks.example:8443/…"
    )
    assert shown_url("https://hooks.example?token=s") == "https://hooks.example/…"
    assert shown_url("http://hooks.example") == "http://hooks.example"


def test_an_error_is_kept_printable_short_and_without_urls() -> None:
    from actors.outbox.hooks import clean

    said = clean(
        "ClientResponseError: 400, url='http://h/T0/secret'\x1b[31m\x00 \udcff" + "x" * 900
    )
    assert "secret" not in said
    assert "<url>" in said
    assert all(ch.isprintable() for ch in said)
    assert len(said) == 300


def test_a_webhook_secret_may_come_from_systemd_credentials(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "webhook-ops").write_text(SECRET)
    path = write(tmp_path, '[[webhooks]]\nname = "ops"\nurl = "https://h/x"\n')
    settings = load_settings(path, env={"CREDENTIALS_DIRECTORY": str(creds)}).settings
    assert settings.webhooks[0].secret == SECRET


async def test_webhooks_come_and_go_with_a_reload(
    tmp_path: Path, pg_dsn: str, redis_url: str, redis_prefix: str, receiver: Receiver
) -> None:
    from tests.test_http import start_daemon

    (tmp_path / "ops.secret").write_text(SECRET)
    base = (
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nlog_level = "warning"\n'
        f'[http]\nport = 0\nunix_socket = "{tmp_path / "jarvisd.sock"}"\n'
        f'[postgres]\ndsn = "{pg_dsn}"\n[redis]\nurl = "{redis_url}"\nprefix = "{redis_prefix}"\n'
        "[events]\npoll_interval = 0.2\n"
    )
    cfg = tmp_path / "jarvisd.toml"
    cfg.write_text(base)
    async for running in start_daemon(load_settings(cfg)):
        await running.wait_ready()
        api = Api(running, str(tmp_path / "jarvisd.sock"))
        try:
            assert (await api.call("GET", "/webhooks", local=True))[2] == []
            cfg.write_text(
                base + f'[[webhooks]]\nname = "late"\nurl = "{receiver.url}"\n'
                'secret_file = "ops.secret"\n'
            )
            plan = await running.daemon.reload()
            assert plan is not None
            assert plan.applied == ["webhooks"]
            await state_is(api, "late", "live")
            _uid, token = await api.user("reloader")
            await commands(api, token, 2)
            await receiver.until(2)
            assert all(g["signed"] for g in receiver.got)
            cfg.write_text(base)
            assert (await running.daemon.reload()) is not None
            assert (await api.call("GET", "/webhooks", local=True))[2] == []
            async with asyncio.timeout(5):  # nothing to deliver: the lock goes too
                while running.daemon.actors.webhooks.lead.conn is not None:
                    await asyncio.sleep(0.05)
            await commands(api, token, 2)
            await asyncio.sleep(0.5)
            assert len(receiver.got) == 2  # gone with the reload
        finally:
            await api.unix.close()


async def test_two_daemons_deliver_through_one_leader_and_the_other_takes_over(
    make_config: Callable[..., LoadedConfig], receiver: Receiver, tmp_path: Path, pg_dsn: str
) -> None:
    h = hook("shared", receiver.url)

    first, second = (
        serve_with_config(one_of_two(make_config, tmp_path, h, 1)),
        serve_with_config(one_of_two(make_config, tmp_path, h, 2)),
    )
    a, b = await anext(first), await anext(second)
    try:
        _uid, token = await a.user("both")
        await commands(a, token, 5)
        await commands(b, token, 5)
        await receiver.until(10)
        await asyncio.sleep(0.5)
        assert receiver.ids() == await outbox_ids(pg_dsn)  # each once: one daemon delivers
        leaders = [x for x in (a, b) if x.r.daemon.actors.webhooks.lead.leader]
        assert len(leaders) == 1
        survivor, gone = (b, first) if leaders[0] is a else (a, second)
        await gone.aclose()  # the leader stops; the other takes over where it got
        await commands(survivor, token, 5)
        await receiver.until(15, timeout=15)
        await asyncio.sleep(0.5)
        assert receiver.ids() == await outbox_ids(pg_dsn)
        assert survivor.r.daemon.actors.webhooks.lead.leader
    finally:
        for gen in (first, second):
            await gen.aclose()


async def test_a_leader_whose_lock_connection_dies_stops_before_the_next_one_starts(
    make_config: Callable[..., LoadedConfig], receiver: Receiver, tmp_path: Path, pg_dsn: str
) -> None:
    """The lock's backend is terminated while events stream: the endpoint
    still gets each event in id order (a repeat of the one in flight at
    most), never two daemons' deliveries interleaved."""
    h = hook("steady", receiver.url)

    receiver.mode, receiver.slow = "slow", 0.01  # a backlog, so that both would be busy
    first, second = (
        serve_with_config(one_of_two(make_config, tmp_path, h, 1)),
        serve_with_config(one_of_two(make_config, tmp_path, h, 2)),
    )
    a, b = await anext(first), await anext(second)
    db = await asyncpg.connect(pg_dsn)
    try:
        _uid, token = await a.user("streamer")
        writing = asyncio.create_task(commands(a, token, 120))
        await receiver.until(30)
        leader = next(x for x in (a, b) if x.r.daemon.actors.webhooks.lead.leader)
        conn = leader.r.daemon.actors.webhooks.lead.conn
        assert conn is not None
        await db.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        await writing
        ids = await outbox_ids(pg_dsn)
        async with asyncio.timeout(20):
            while set(receiver.ids()) != set(ids):
                await asyncio.sleep(0.05)
        got = receiver.ids()
        firsts = list(dict.fromkeys(got))  # each id where it first came
        assert firsts == ids  # in order, none missing
        assert len(got) - len(ids) <= 2  # a repeat of what was in flight, at most
    finally:
        await db.close()
        for gen in (first, second):
            await gen.aclose()


def one_of_two(
    make_config: Callable[..., LoadedConfig], tmp_path: Path, h: WebhookSettings, n: int
) -> LoadedConfig:
    """Daemon ``n`` of two on one database, both with the webhook ``h``."""
    loaded = make_config(
        events={"poll_interval": 0.2},
        daemon={"state_dir": str(tmp_path / f"state{n}")},
        http={"unix_socket": str(tmp_path / f"d{n}.sock")},
    )
    return LoadedConfig(settings=msgspec.structs.replace(loaded.settings, webhooks=(h,)), path=None)


async def serve_with_config(loaded: LoadedConfig) -> AsyncGenerator[Api, None]:
    """A daemon, stopped when this is closed (not whenever the loop gets to it)."""
    from tests.test_http import start_daemon

    started = start_daemon(loaded)
    running = await anext(started)
    try:
        await running.wait_ready()
        client = Api(running, str(loaded.settings.http.unix_socket))
        try:
            await state_is(client, loaded.settings.webhooks[0].name, "live")
            yield client
        finally:
            await client.unix.close()
    finally:
        await started.aclose()
