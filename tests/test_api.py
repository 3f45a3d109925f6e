"""The REST API end to end on an in-process daemon: routes, roles, lists, auth."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from config import LoadedConfig
from tests.test_http import Running, start_daemon


class Api:
    def __init__(self, running: Running, socket_path: str) -> None:
        self.r = running
        self.base = running.base
        self.unix = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path))

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        local: bool = False,
        headers: dict[str, str] | None = None,
        data: Any = None,
    ) -> tuple[int, Any, Any]:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        session = self.unix if local else self.r.session
        base = "http://localhost" if local else self.base
        async with session.request(method, base + path, json=json, headers=hdrs, data=data) as resp:
            text = await resp.text()
            body = None
            if text and resp.content_type in ("application/json", "application/problem+json"):
                body = await resp.json(content_type=None)
            return resp.status, resp.headers, body

    async def user(
        self, username: str, role: str = "user", password: str | None = None
    ) -> tuple[int, str]:
        """Create a user as the local admin; return (id, API token)."""
        status, _h, user = await self.call(
            "POST",
            "/users",
            local=True,
            json={"username": username, "role": role, "password": password},
        )
        assert status == 201, user
        status, _h, created = await self.call(
            "POST", f"/users/{user['id']}/tokens", local=True, json={"name": "test"}
        )
        assert status == 201, created
        return user["id"], created["token"]


async def serve_api(loaded: LoadedConfig) -> AsyncIterator[Api]:
    """A daemon on ``loaded``, ready, and a client of its API."""
    async for running in start_daemon(loaded):
        await running.wait_ready()
        client = Api(running, str(loaded.settings.http.unix_socket))
        try:
            yield client
        finally:
            await client.unix.close()


@pytest.fixture
async def api(make_config: Callable[..., LoadedConfig]) -> AsyncIterator[Api]:
    loaded = make_config()
    async for client in serve_api(loaded):
        yield client


# -- authentication ------------------------------------------------------------------------------------
async def test_without_credentials_every_api_route_is_401_with_a_bearer_challenge(api: Api) -> None:
    for method, path in [
        ("GET", "/users"),
        ("GET", "/users/1"),
        ("POST", "/users"),
        ("GET", "/commands"),
        ("POST", "/commands"),
        ("PUT", "/commands/1"),
        ("GET", "/approvals"),
        ("PUT", "/approvals/1/approve"),
        ("GET", "/users/1/tokens"),
    ]:
        status, headers, body = await api.call(method, path, json={})
        assert status == 401, (method, path)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert headers["Content-Type"] == "application/problem+json"
        assert body["status"] == 401


async def test_bad_tokens_and_bad_schemes_are_401(api: Api) -> None:
    for header in (
        "Bearer jv_not-a-real-token",
        "Bearer some-session-that-does-not-exist-xxxxxxxx",
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer " + "x" * 600,
    ):
        status, _h, _b = await api.call("GET", "/commands", headers={"Authorization": header})
        assert status == 401, header


async def test_the_local_unix_socket_peer_is_admin(api: Api) -> None:
    status, _h, page = await api.call("GET", "/users", local=True)
    assert status == 200
    assert [u["username"] for u in page["items"]] == ["admin"]


async def test_the_first_start_creates_an_admin_and_a_0600_token_file(api: Api) -> None:
    path = Path(api.r.daemon.settings.daemon.state_dir) / "admin-token"
    async with asyncio.timeout(10):
        while not path.exists():
            await asyncio.sleep(0.05)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    token = path.read_text().strip()
    status, _h, page = await api.call("GET", "/users", token=token)
    assert status == 200
    assert page["items"][0]["role"] == "admin"


# -- users ----------------------------------------------------------------------------------------------
async def test_user_crud_as_admin(api: Api) -> None:
    status, headers, user = await api.call(
        "POST",
        "/users",
        local=True,
        json={"username": "Ada", "role": "approver", "email": "ada@example.org"},
    )
    assert status == 201
    assert headers["Location"] == f"/users/{user['id']}"
    assert user["role"] == "approver"
    assert "passwordHash" not in user
    status, _h, dup = await api.call("POST", "/users", local=True, json={"username": "ADA"})
    assert status == 409
    assert "taken" in dup["detail"]
    status, _h, changed = await api.call(
        "PUT",
        f"/users/{user['id']}",
        local=True,
        json={"preferences": {"voice": "calm"}, "disabled": True},
    )
    assert status == 200
    assert changed["preferences"] == {"voice": "calm"}
    assert changed["disabled"] is True
    assert changed["email"] == "ada@example.org"  # untouched: only present fields change
    assert (await api.call("DELETE", f"/users/{user['id']}", local=True))[0] == 204
    assert (await api.call("GET", f"/users/{user['id']}", local=True))[0] == 404
    assert (await api.call("DELETE", f"/users/{user['id']}", local=True))[0] == 404


async def test_invalid_user_bodies_are_400_with_a_clear_detail(api: Api) -> None:
    cases = [
        ({"username": "has space"}, "username"),
        ({"username": "ok", "role": "root"}, "role"),
        ({"username": "ok", "extra": 1}, "extra"),
        ({"username": "ok", "password": "short"}, "password"),
        ({"username": "ok", "email": "not-an-email"}, "email"),
        ({"username": 7}, "username"),
    ]
    for payload, word in cases:
        status, headers, body = await api.call("POST", "/users", local=True, json=payload)
        assert status == 400, payload
        assert headers["Content-Type"] == "application/problem+json"
        assert word in body["detail"], body
    status, _h, body = await api.call(
        "POST",
        "/users",
        local=True,
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert status == 400
    assert (await api.call("GET", "/users/abc", local=True))[0] == 404


async def test_the_last_enabled_admin_cannot_be_removed_or_demoted(api: Api) -> None:
    _status, _h, page = await api.call("GET", "/users?role=admin", local=True)
    admin_id = page["items"][0]["id"]
    assert (await api.call("DELETE", f"/users/{admin_id}", local=True))[0] == 409
    assert (await api.call("PUT", f"/users/{admin_id}", local=True, json={"role": "user"}))[
        0
    ] == 409
    assert (await api.call("GET", f"/users/{admin_id}", local=True))[2]["role"] == "admin"


async def test_role_boundaries_on_users(api: Api) -> None:
    uid, user_token = await api.user("bob")
    other, _ = await api.user("carol")
    _agent_id, agent_token = await api.user("pc-agent", "agent")
    assert (await api.call("GET", "/users", token=agent_token))[0] == 403
    assert (await api.call("POST", "/users", token=agent_token, json={"username": "x"}))[0] == 403
    assert (await api.call("GET", "/users", token=user_token))[0] == 403
    assert (await api.call("GET", f"/users/{other}", token=user_token))[0] == 403
    assert (await api.call("GET", f"/users/{uid}", token=user_token))[0] == 200
    status, _h, me = await api.call(
        "PUT", f"/users/{uid}", token=user_token, json={"email": "bob@example.org"}
    )
    assert (status, me["email"]) == (200, "bob@example.org")
    assert (await api.call("PUT", f"/users/{uid}", token=user_token, json={"role": "admin"}))[
        0
    ] == 403
    assert (await api.call("PUT", f"/users/{uid}", token=user_token, json={"disabled": False}))[
        0
    ] == 403
    assert (await api.call("DELETE", f"/users/{other}", token=user_token))[0] == 403


async def test_a_disabled_users_token_stops_working(api: Api) -> None:
    uid, token = await api.user("dave")
    assert (await api.call("GET", f"/users/{uid}", token=token))[0] == 200
    await api.call("PUT", f"/users/{uid}", local=True, json={"disabled": True})
    assert (await api.call("GET", f"/users/{uid}", token=token))[0] == 401


# -- tokens ------------------------------------------------------------------------------------------------
async def test_tokens_are_shown_once_listed_by_prefix_and_revocable(api: Api) -> None:
    uid, token = await api.user("erin")
    status, _h, made = await api.call(
        "POST", f"/users/{uid}/tokens", token=token, json={"name": "laptop"}
    )
    assert status == 201
    assert made["token"].startswith("jv_")
    status, _h, listed = await api.call("GET", f"/users/{uid}/tokens", token=token)
    assert status == 200
    assert {t["name"] for t in listed} == {"test", "laptop"}
    assert all("token" not in t and t["prefix"].startswith("jv_") for t in listed)
    assert made["token"] not in str(listed)
    status, _h, revoked = await api.call(
        "DELETE", f"/users/{uid}/tokens/{made['info']['id']}", token=token
    )
    assert status == 200
    assert revoked["revokedAt"] is not None
    assert (await api.call("GET", f"/users/{uid}", token=made["token"]))[0] == 401
    other, _ = await api.user("frank")
    assert (await api.call("GET", f"/users/{other}/tokens", token=token))[0] == 403
    assert (await api.call("DELETE", f"/users/{uid}/tokens/999999", token=token))[0] == 404


async def test_tokens_are_stored_hashed(api: Api, pg_dsn: str) -> None:
    _uid, token = await api.user("gina")
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch("SELECT token_hash, prefix FROM api_tokens")
    finally:
        await conn.close()
    assert all(token.encode() not in bytes(r["token_hash"]) for r in rows)
    assert any(token.startswith(r["prefix"]) for r in rows)


# -- commands -------------------------------------------------------------------------------------------------
async def test_commands_are_idempotent_on_their_request_id(api: Api) -> None:
    uid, token = await api.user("hal")
    payload = {
        "requestId": "req-1",
        "action": "open_app",
        "type": "voice",
        "parameters": {"app": "mail"},
    }
    status, headers, first = await api.call("POST", "/commands", token=token, json=payload)
    assert status == 201
    assert headers["Location"] == f"/commands/{first['id']}"
    assert (first["userId"], first["status"], first["riskCategory"]) == (uid, "approved", "LOW")
    status, _h, again = await api.call("POST", "/commands", token=token, json=payload)
    assert status == 200
    assert again["id"] == first["id"]


async def test_a_risky_command_waits_for_approval_with_a_bound_request(api: Api) -> None:
    _uid, token = await api.user("ivy")
    status, _h, cmd = await api.call(
        "POST",
        "/commands",
        token=token,
        json={
            "action": "delete_file",
            "parameters": {"path": "/home/u/important.pdf"},
            "riskScore": 85,
        },
    )
    assert status == 201
    assert (cmd["status"], cmd["riskCategory"]) == ("awaiting_approval", "HIGH")
    status, _h, approval = await api.call("GET", f"/approvals/{cmd['approvalId']}", token=token)
    assert status == 200
    assert (approval["commandId"], approval["status"], approval["riskScore"]) == (
        cmd["id"],
        "pending",
        85,
    )
    assert len(approval["parametersDigest"]) == 64


async def test_users_see_only_their_own_commands(api: Api) -> None:
    _a, alice = await api.user("alice")
    _b, bob = await api.user("bobby")
    _s, agent = await api.user("voice-agent", "agent")
    _, _, mine = await api.call("POST", "/commands", token=alice, json={"action": "a"})
    _, _, theirs = await api.call("POST", "/commands", token=bob, json={"action": "b"})
    assert (await api.call("GET", f"/commands/{theirs['id']}", token=alice))[0] == 404
    status, _h, page = await api.call("GET", "/commands", token=alice)
    assert [c["id"] for c in page["items"]] == [mine["id"]]
    status, _h, page = await api.call("GET", f"/commands?userId={theirs['userId']}", token=alice)
    assert status == 200
    assert page["items"] == []  # the forced filter wins over the requested one
    assert (
        await api.call(
            "POST", "/commands", token=alice, json={"action": "x", "userId": theirs["userId"]}
        )
    )[0] == 403
    _status, _h, page = await api.call("GET", "/commands", token=agent)
    assert {c["id"] for c in page["items"]} == {mine["id"], theirs["id"]}


async def test_status_reports_follow_the_state_machine(api: Api) -> None:
    uid, user = await api.user("jim")
    _a, agent = await api.user("runner", "agent")
    _, _, cmd = await api.call(
        "POST", "/commands", token=agent, json={"action": "play_music", "userId": uid}
    )
    url = f"/commands/{cmd['id']}"
    assert (await api.call("PUT", url, token=user, json={"status": "running"}))[0] == 403
    status, _h, running = await api.call("PUT", url, token=agent, json={"status": "running"})
    assert (status, running["status"]) == (200, "running")
    assert running["startedAt"] is not None
    status, _h, _again = await api.call("PUT", url, token=agent, json={"status": "running"})
    assert status == 200  # a repeated report is a no-op
    status, _h, done = await api.call(
        "PUT", url, token=agent, json={"status": "succeeded", "result": {"ok": 1}}
    )
    assert (status, done["status"], done["result"]) == (200, "succeeded", {"ok": 1})
    assert done["durationMs"] is not None
    status, _h, late = await api.call("PUT", url, token=agent, json={"status": "running"})
    assert (status, late["status"]) == (200, "succeeded")  # a late start: a no-op
    status, _h, conflict = await api.call(
        "PUT", url, token=agent, json={"status": "cancelled", "reason": "too late"}
    )
    assert status == 409
    assert conflict["current"]["status"] == "succeeded"
    assert (await api.call("PUT", url, token=agent, json={"status": "pending"}))[0] == 400
    assert (await api.call("PUT", "/commands/999999", token=agent, json={"status": "running"}))[
        0
    ] == 404


# -- approvals -----------------------------------------------------------------------------------------------------
async def test_approval_rules_own_request_reason_critical(api: Api) -> None:
    _r, requester = await api.user("kim")
    _p, approver = await api.user("lee", "approver")
    _, _, cmd = await api.call(
        "POST", "/commands", token=requester, json={"action": "transfer", "riskScore": 75}
    )
    aid = cmd["approvalId"]
    assert (await api.call("PUT", f"/approvals/{aid}/approve", token=requester))[0] == 403
    status, _h, body = await api.call("PUT", f"/approvals/{aid}/reject", token=approver, json={})
    assert status == 400
    assert "reason" in body["detail"]
    status, _h, approved = await api.call("PUT", f"/approvals/{aid}/approve", token=approver)
    assert (status, approved["status"], approved["decidedBy"]) == (200, "approved", _p)
    assert (await api.call("GET", f"/commands/{cmd['id']}", token=requester))[2][
        "status"
    ] == "approved"
    _, _, critical = await api.call(
        "POST", "/approvals", token=requester, json={"action": "wipe_disk", "riskScore": 95}
    )
    assert critical["riskCategory"] == "CRITICAL"
    assert (await api.call("PUT", f"/approvals/{critical['id']}/approve", token=approver))[0] == 403
    assert (await api.call("PUT", f"/approvals/{critical['id']}/approve", local=True))[0] == 200
    _, _, mine = await api.call(
        "POST", "/approvals", token=requester, json={"action": "x", "riskScore": 50}
    )
    status, _h, cancelled = await api.call(
        "PUT", f"/approvals/{mine['id']}/cancel", token=requester
    )
    assert (status, cancelled["status"]) == (200, "cancelled")
    assert (await api.call("PUT", f"/approvals/{mine['id']}/approve", token=approver))[0] == 409


async def test_two_concurrent_decisions_exactly_one_wins_the_other_gets_409(api: Api) -> None:
    _r, requester = await api.user("mia")
    _a, first = await api.user("ned", "approver")
    _b, second = await api.user("oli", "approver")
    for _ in range(5):
        _, _, approval = await api.call(
            "POST", "/approvals", token=requester, json={"action": "x", "riskScore": 80}
        )
        url = f"/approvals/{approval['id']}"
        results = await asyncio.gather(
            api.call("PUT", url + "/approve", token=first),
            api.call("PUT", url + "/reject", token=second, json={"reason": "no"}),
        )
        statuses = sorted(r[0] for r in results)
        assert statuses == [200, 409]
        final = (await api.call("GET", url, token=first))[2]
        winner = next(r for r in results if r[0] == 200)[2]
        assert final["status"] == winner["status"]


async def test_users_see_only_their_own_approvals(api: Api) -> None:
    _a, alice = await api.user("pat")
    _b, bob = await api.user("quinn")
    _, _, theirs = await api.call(
        "POST", "/approvals", token=bob, json={"action": "x", "riskScore": 10}
    )
    assert (await api.call("GET", f"/approvals/{theirs['id']}", token=alice))[0] == 404
    assert (await api.call("PUT", f"/approvals/{theirs['id']}/cancel", token=alice))[0] == 404
    assert (await api.call("GET", "/approvals", token=alice))[2]["items"] == []


# -- lists ----------------------------------------------------------------------------------------------------------
async def seed_commands(api: Api, token: str, n: int) -> list[dict[str, Any]]:
    made = []
    for i in range(n):
        _, _, c = await api.call(
            "POST",
            "/commands",
            token=token,
            json={
                "action": f"act_{i % 3}",
                "description": f"turn on the {'kitchen' if i % 2 else 'garden'} lights",
                "riskScore": i % 100,
                "type": "voice" if i % 2 else "text",
            },
        )
        made.append(c)
    return made


async def test_keyset_pages_walk_every_row_once_in_order(api: Api) -> None:
    _u, token = await api.user("rae", "agent")
    made = await seed_commands(api, token, 120)
    seen: list[int] = []
    url = "/commands?limit=50"
    pages = 0
    while url:
        status, _h, page = await api.call("GET", url, token=token)
        assert status == 200
        seen += [c["id"] for c in page["items"]]
        pages += 1
        url = f"/commands?limit=50&cursor={page['nextCursor']}" if page["nextCursor"] else ""
    assert pages == 3
    assert seen == sorted((c["id"] for c in made), reverse=True)


async def test_filters_ranges_full_text_order_and_counts(api: Api) -> None:
    _u, token = await api.user("sam", "agent")
    made = await seed_commands(api, token, 30)
    status, headers, page = await api.call(
        "GET",
        "/commands?type=voice&riskScoreMin=10&riskScoreMax=20",
        token=token,
        headers={"Prefer": "count=exact"},
    )
    assert status == 200
    expected = [c for c in made if c["type"] == "voice" and 10 <= c["riskScore"] <= 20]
    assert sorted(c["id"] for c in page["items"]) == sorted(c["id"] for c in expected)
    assert page["count"] == len(expected)
    assert headers["Preference-Applied"] == "count=exact"
    status, _h, page = await api.call(
        "GET", "/commands?q=kitchen&order=-riskScore&limit=200", token=token
    )
    assert all("kitchen" in c["description"] for c in page["items"])
    assert len(page["items"]) == 15
    scores = [c["riskScore"] for c in page["items"]]
    assert scores == sorted(scores, reverse=True)
    status, _h, page = await api.call(
        "GET", "/commands?status=approved,awaiting_approval&action=act_1", token=token
    )
    assert {c["action"] for c in page["items"]} == {"act_1"}
    after = made[10]["createdAt"]
    status, _h, page = await api.call(
        "GET", f"/commands?createdAfter={after.replace('+', '%2B')}&limit=200", token=token
    )
    assert status == 200
    assert {c["id"] for c in page["items"]} >= {c["id"] for c in made[11:]}
    status, _h, page = await api.call(
        "GET", "/commands?limit=5&page=2", token=token, headers={"Prefer": "count=estimated"}
    )
    assert [c["id"] for c in page["items"]] == [c["id"] for c in reversed(made)][5:10]
    assert page["count"] is not None


async def test_bad_list_parameters_are_400(api: Api) -> None:
    _u, token = await api.user("tom", "agent")
    await seed_commands(api, token, 3)
    _, _, page = await api.call("GET", "/commands?limit=1", token=token)
    cursor = page["nextCursor"]
    for query in (
        "limit=0",
        "limit=201",
        "limit=abc",
        "order=password_hash",
        "order=-status",
        "status=approved&status=failed",
        "status=exploded",
        "offset=10001",
        "page=0",
        "page=202&limit=50",
        "cursor=garbage",
        f"cursor={cursor}&order=riskScore",
        "offset=5001",
        "page=27",
        "riskScoreMin=101",
        "userId=0",
        "createdAfter=yesterday",
        "createdAfter=2026-01-01T00:00:00",
        "riskScoreMin=1e9999",
        "userId=1.5",
        "nope=1",
    ):
        status, headers, body = await api.call("GET", f"/commands?{query}", token=token)
        assert status == 400, query
        assert headers["Content-Type"] == "application/problem+json", query
        assert body["detail"], query


INJECTIONS = [
    "'; DROP TABLE commands; --",
    "1 OR 1=1",
    "approved') OR ('1'='1",
    "1; SELECT pg_sleep(5)",
    "\\'",
    "%' OR '%'='",
    "created_at DESC; DROP TABLE users",
    "id)--",
    "$1",
    "\x00",
]


async def test_sql_injection_in_every_filter_and_order_is_rejected_or_harmless(
    api: Api, pg_dsn: str
) -> None:
    _u, token = await api.user("uma", "agent")
    await seed_commands(api, token, 5)
    for path, names in (
        (
            "/commands",
            [
                "userId",
                "status",
                "type",
                "action",
                "riskCategory",
                "riskScoreMin",
                "riskScoreMax",
                "createdAfter",
                "createdBefore",
                "q",
                "order",
                "cursor",
            ],
        ),
        (
            "/approvals",
            [
                "status",
                "riskCategory",
                "requesterId",
                "commandId",
                "createdAfter",
                "createdBefore",
                "q",
                "order",
                "cursor",
            ],
        ),
        ("/users", ["role", "disabled", "q", "order", "cursor"]),
    ):
        for name in names:
            for payload in INJECTIONS:
                query = urllib.parse.quote(payload, safe="")
                status, _h, body = await api.call("GET", f"{path}?{name}={query}", local=True)
                assert status in (200, 400), (path, name, payload, status, body)
                if status == 200:
                    assert body["items"] == [] or name in ("q",), (path, name, payload)
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM commands") == 5
        assert await conn.fetchval("SELECT count(*) FROM users") >= 2
    finally:
        await conn.close()


# -- bodies, login, openapi ---------------------------------------------------------------------------------------------
async def test_a_body_over_the_limit_is_413(api: Api) -> None:
    _u, token = await api.user("vic")
    big = json.dumps({"action": "x", "parameters": {"blob": "z" * 2_000_000}}).encode()
    status, _h, body = await api.call(
        "POST",
        "/commands",
        token=token,
        data=io.BytesIO(big),
        headers={"Content-Type": "application/json", "Content-Length": str(len(big))},
    )
    assert status == 413
    assert "limit" in body["detail"]
    # Without a Content-Length (chunked), the limit is enforced while reading.
    chunked = aiohttp.ClientSession()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    try:
        async with chunked.post(
            api.base + "/commands",
            data=chunks(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 413
    finally:
        await chunked.close()


async def test_login_gives_a_session_that_authenticates_rotates_and_logs_out(api: Api) -> None:
    uid, _token = await api.user("wes", password="correct horse battery")
    assert (
        await api.call(
            "POST", "/auth/login", json={"username": "wes", "password": "wrong password"}
        )
    )[0] == 401
    assert (
        await api.call("POST", "/auth/login", json={"username": "nobody", "password": "whatever1"})
    )[0] == 401
    status, _h, login = await api.call(
        "POST", "/auth/login", json={"username": "WES", "password": "correct horse battery"}
    )
    assert status == 201
    session = login["token"]
    assert login["user"]["id"] == uid
    status, _h, me = await api.call("GET", f"/users/{uid}", token=session)
    assert (status, me["lastLoginAt"] is not None) == (200, True)
    status, _h, again = await api.call(
        "POST",
        "/auth/login",
        token=session,
        json={"username": "wes", "password": "correct horse battery"},
    )
    assert status == 201
    assert again["token"] != session
    assert (await api.call("GET", f"/users/{uid}", token=session))[0] == 401  # rotated away
    rotated = again["token"]
    status, _h, listed = await api.call("GET", f"/users/{uid}/sessions", token=rotated)
    assert status == 200
    assert len(listed) == 1
    assert (await api.call("POST", "/auth/logout", token=rotated))[0] == 204
    assert (await api.call("GET", f"/users/{uid}", token=rotated))[0] == 401
    assert (await api.call("POST", "/auth/logout", token=rotated))[0] == 401


async def test_disabling_a_user_ends_their_sessions_at_once(api: Api) -> None:
    uid, _t = await api.user("xena", password="long enough pw")
    _, _, login = await api.call(
        "POST", "/auth/login", json={"username": "xena", "password": "long enough pw"}
    )
    assert (await api.call("GET", f"/users/{uid}", token=login["token"]))[
        0
    ] == 200  # user now cached
    await api.call("PUT", f"/users/{uid}", local=True, json={"disabled": True})
    assert (await api.call("GET", f"/users/{uid}", token=login["token"]))[0] == 401


async def test_openapi_describes_every_route_from_the_same_types(api: Api) -> None:
    status, _h, doc = await api.call("GET", "/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    from jarvisd.http.openapi import ROUTES

    for route in ROUTES:
        assert route.method.lower() in doc["paths"][route.path], route.path
    schemas = doc["components"]["schemas"]
    assert {"User", "UserCreate", "Command", "CommandCreate", "Approval", "Problem"} <= set(schemas)
    assert "riskScore" in schemas["Command"]["properties"]
    refs = [v for v in _walk(doc) if isinstance(v, str) and v.startswith("#/components/schemas/")]
    assert refs
    assert all(r.rsplit("/", 1)[1] in schemas for r in refs)


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
    else:
        yield node


async def test_health_can_be_put_behind_authentication(
    make_config: Callable[..., LoadedConfig],
) -> None:
    loaded = make_config(http={"public_health": False})
    async for running in start_daemon(loaded):
        assert (await running.get("/health/live"))[0] == 200  # liveness stays open for supervisors
        for path in ("/health/ready", "/health", "/stats", "/metrics", "/redis/stats"):
            status, _ctype, _body = await running.get(path)
            assert status == 401, path
        assert loaded.settings.http.unix_socket is not None
        connector = aiohttp.UnixConnector(path=loaded.settings.http.unix_socket)
        async with (
            aiohttp.ClientSession(connector=connector) as local,
            local.get("http://x/stats") as resp,
        ):
            assert resp.status == 200  # the local admin


async def test_user_lists_filter_by_role_state_and_text(api: Api) -> None:
    await api.user("zed-approver", "approver")
    await api.user("zed-agent", "agent")
    bad, _ = await api.user("zed-off")
    await api.call("PUT", f"/users/{bad}", local=True, json={"disabled": True})
    _s, _h, page = await api.call(
        "GET", "/users?role=approver,agent&q=zed&order=username", local=True
    )
    assert [u["username"] for u in page["items"]] == ["zed-agent", "zed-approver"]
    _s, _h, page = await api.call("GET", "/users?disabled=true", local=True)
    assert [u["username"] for u in page["items"]] == ["zed-off"]
    _s, _h, page = await api.call("GET", "/users?q=%25", local=True)  # a literal %, not a wildcard
    assert page["items"] == []
    assert (await api.call("GET", "/users?disabled=maybe", local=True))[0] == 400


async def test_a_user_lists_and_revokes_their_own_sessions(api: Api) -> None:
    uid, token = await api.user("yan", password="pass word here")
    for _ in range(2):
        await api.call(
            "POST", "/auth/login", json={"username": "yan", "password": "pass word here"}
        )
    status, _h, sessions = await api.call("GET", f"/users/{uid}/sessions", token=token)
    assert (status, len(sessions)) == (200, 2)
    assert all("id" not in s for s in sessions)  # the bearer ids are never listed
    other, _ = await api.user("yan-other")
    assert (await api.call("GET", f"/users/{other}/sessions", token=token))[0] == 403
    status, _h, revoked = await api.call("DELETE", f"/users/{uid}/sessions", token=token)
    assert (status, revoked) == (200, {"revoked": 2})
    assert (await api.call("GET", f"/users/{uid}/sessions", token=token))[2] == []
