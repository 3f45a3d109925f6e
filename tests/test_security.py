"""Attacks on the API, each closed: no role becomes another, no approval is
decided without a person, bad input never answers 5xx, nothing secret reaches
a log, and nothing a client names grows without bound."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import structlog

from actors.data import credentials
from config import LoadedConfig
from jarvisd.http.keys import HTTP_METRICS, TRANSPORTS
from jarvisd.logs import configure
from tests.test_api import Api, serve_api

# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def config_overrides() -> dict[str, dict[str, Any]]:
    return {}


@pytest.fixture
async def api(
    make_config: Callable[..., LoadedConfig], config_overrides: dict[str, dict[str, Any]]
) -> AsyncIterator[Api]:
    loaded = make_config(**config_overrides)
    async for client in serve_api(loaded):
        yield client


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Everything the daemon logs during the test, as JSON lines."""
    buf = io.StringIO()
    configure("debug", "json", stream=buf)
    yield buf
    structlog.reset_defaults()


async def login(api: Api, username: str, password: str) -> str:
    status, _h, body = await api.call(
        "POST", "/auth/login", json={"username": username, "password": password}
    )
    assert status == 201, body
    return str(body["token"])


async def admin_id(api: Api) -> int:
    _s, _h, page = await api.call("GET", "/users?role=admin", local=True)
    return int(page["items"][0]["id"])


async def raw_http(api: Api, payload: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send bytes as they are on a TCP connection; return all that comes back."""
    port = api.r.daemon.http.bound_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(read_timeout):
            return await reader.read()
    finally:
        writer.close()


# --- 1. sessions made through /sessions are never credentials ------------------------------------------


async def test_an_agent_session_for_an_admin_is_not_a_credential(api: Api) -> None:
    _a, agent = await api.user("rogue-agent", "agent")
    admin = await admin_id(api)
    status, _h, made = await api.call(
        "POST", "/sessions", token=agent, json={"userId": admin, "data": {"x": 1}}
    )
    assert status == 201, made
    assert made["kind"] == "app"
    for path in ("/users", f"/users/{admin}", "/commands"):
        status, _h, _b = await api.call("GET", path, token=made["id"])
        assert status == 401, path
    # The session still works as what it is: data a service keeps.
    status, _h, got = await api.call("GET", f"/sessions/{made['id']}", token=agent)
    assert (status, got["data"]) == (200, {"x": 1})


async def test_a_user_cannot_create_a_session_for_anyone_else(api: Api) -> None:
    _u, user = await api.user("plain")
    admin = await admin_id(api)
    status, _h, _b = await api.call("POST", "/sessions", token=user, json={"userId": admin})
    assert status == 403


async def test_a_login_session_is_not_reachable_through_the_sessions_routes(api: Api) -> None:
    uid, _t = await api.user("logs-in", password="long password 1")
    session = await login(api, "logs-in", "long password 1")
    _a, agent = await api.user("svc", "agent")
    for method, body in (("GET", None), ("PUT", {"data": {"role": "admin"}}), ("DELETE", None)):
        status, _h, _b = await api.call(method, f"/sessions/{session}", token=agent, json=body)
        assert status == 404, method
    status, _h, me = await api.call("GET", f"/users/{uid}", token=session)
    assert (status, me["role"]) == (200, "user")


# --- 2. nothing the cache routes write is read back as authority --------------------------------------


async def test_writing_role_admin_into_the_cache_changes_nobodys_role(
    api: Api, raw: aioredis.Redis, redis_prefix: str
) -> None:
    uid, _t = await api.user("victim", password="long password 2")
    session = await login(api, "victim", "long password 2")
    _a, agent = await api.user("poisoner", "agent")
    forged = {"id": uid, "username": "victim", "role": "admin", "disabled": False}
    for namespace in ("users", "default", "jarvisd", "auth", "login", "sessions"):
        for key in (str(uid), f"user:{uid}", "1"):
            status, _h, _b = await api.call(
                "POST",
                "/cache/set",
                token=agent,
                json={"namespace": namespace, "key": key, "value": forged, "tags": [f"user:{uid}"]},
            )
            assert status == 200
    assert (await api.call("GET", "/users", token=session))[0] == 403
    # Every key the cache routes wrote lives under the cache key space only.
    written = [k.decode() async for k in raw.scan_iter(match=f"{redis_prefix}*")]
    cache_space = (f"{redis_prefix}cache:", f"{redis_prefix}cache-tag:")
    login_space = (
        f"{redis_prefix}login:",
        f"{redis_prefix}login-user:",
        f"{redis_prefix}login-fail:",
    )
    inbox = (f"{redis_prefix}inbox",)  # the bus's stream
    assert all(k.startswith(cache_space + login_space + inbox) for k in written), written
    assert not any(k.startswith(cache_space) and "login" in k.split(":")[2] for k in written)


# --- 3. a standalone approval never decides a command -------------------------------------------------


async def test_a_standalone_request_cannot_attach_to_someone_elses_critical_command(
    api: Api,
) -> None:
    _o, owner = await api.user("owner")
    _u, attacker = await api.user("attacker")
    _p, approver = await api.user("approver-1", "approver")
    _d, admin = await api.user("admin-1", "admin")
    _, _, cmd = await api.call(
        "POST", "/commands", token=owner, json={"action": "wipe_disk", "riskScore": 95}
    )
    assert (cmd["status"], cmd["riskCategory"]) == ("awaiting_approval", "CRITICAL")
    status, _h, problem = await api.call(
        "POST",
        "/approvals",
        token=attacker,
        json={"action": "wipe_disk", "riskScore": 70, "commandId": cmd["id"]},
    )
    assert status == 400
    assert "commandId" in problem["detail"]
    # A standalone request the attacker may make, approved, moves no command.
    _, _, standalone = await api.call(
        "POST", "/approvals", token=attacker, json={"action": "wipe_disk", "riskScore": 70}
    )
    assert standalone["commandId"] is None
    assert standalone["riskCategory"] == "CRITICAL"  # the policy's score for wipe_*, not 70
    status, _h, _b = await api.call("PUT", f"/approvals/{standalone['id']}/approve", token=approver)
    assert status == 403  # CRITICAL needs an admin
    status, _h, _b = await api.call("PUT", f"/approvals/{standalone['id']}/approve", token=admin)
    assert status == 200
    _s, _h, after = await api.call("GET", f"/commands/{cmd['id']}", local=True)
    assert after["status"] == "awaiting_approval"
    _s, _h, own = await api.call("GET", f"/approvals/{cmd['approvalId']}", local=True)
    assert own["status"] == "pending"
    # And the attacker cannot see the owner's command or its request at all.
    assert (await api.call("GET", f"/commands/{cmd['id']}", token=attacker))[0] == 404
    assert (await api.call("GET", f"/approvals/{cmd['approvalId']}", token=attacker))[0] == 404
    assert (await api.call("GET", "/approvals/999999", token=attacker))[0] == 404


# --- 4. a status report never decides an approval ------------------------------------------------------


async def test_an_agent_status_report_cannot_approve_a_waiting_command(api: Api) -> None:
    uid, _user = await api.user("asker")
    _a, agent = await api.user("reporter", "agent")
    _, _, cmd = await api.call(
        "POST",
        "/commands",
        token=agent,
        json={"action": "transfer", "riskScore": 80, "userId": uid},
    )
    url = f"/commands/{cmd['id']}"
    for status_name in ("approved", "rejected", "expired", "awaiting_approval", "pending"):
        status, _h, problem = await api.call("PUT", url, token=agent, json={"status": status_name})
        assert status == 400, (status_name, problem)
    status, _h, conflict = await api.call("PUT", url, token=agent, json={"status": "running"})
    assert status == 409
    assert conflict["current"]["status"] == "awaiting_approval"
    assert (await api.call("GET", url, local=True))[2]["status"] == "awaiting_approval"


async def test_cancelling_a_waiting_command_cancels_its_approval_request(api: Api) -> None:
    uid, _user = await api.user("canceller")
    _a, agent = await api.user("runner-agent", "agent")
    _p, approver = await api.user("approver-2", "approver")
    _, _, cmd = await api.call(
        "POST",
        "/commands",
        token=agent,
        json={"action": "transfer", "riskScore": 80, "userId": uid},
    )
    status, _h, cancelled = await api.call(
        "PUT", f"/commands/{cmd['id']}", token=agent, json={"status": "cancelled"}
    )
    assert (status, cancelled["status"]) == (200, "cancelled")
    _s, _h, approval = await api.call("GET", f"/approvals/{cmd['approvalId']}", local=True)
    assert approval["status"] == "cancelled"
    status, _h, _b = await api.call(
        "PUT", f"/approvals/{cmd['approvalId']}/approve", token=approver
    )
    assert status == 409
    assert (await api.call("GET", f"/commands/{cmd['id']}", local=True))[2]["status"] == "cancelled"


# --- 5. nobody decides what they created, for whomever they created it -----------------------------------


async def test_an_approver_cannot_approve_a_command_they_created_for_someone_else(
    api: Api,
) -> None:
    uid, _user = await api.user("beneficiary")
    _p, approver = await api.user("approver-3", "approver")
    _q, other_approver = await api.user("approver-4", "approver")
    status, _h, cmd = await api.call(
        "POST",
        "/commands",
        token=approver,
        json={"action": "transfer", "riskScore": 80, "userId": uid},
    )
    assert status == 201
    assert (cmd["userId"], cmd["status"]) == (uid, "awaiting_approval")
    aid = cmd["approvalId"]
    for decision, body in (("approve", None), ("reject", {"reason": "mine"})):
        status, _h, problem = await api.call(
            "PUT", f"/approvals/{aid}/{decision}", token=approver, json=body
        )
        assert status == 403, decision
        assert "created" in problem["detail"]
    status, _h, approved = await api.call("PUT", f"/approvals/{aid}/approve", token=other_approver)
    assert (status, approved["status"]) == (200, "approved")
    assert (await api.call("GET", f"/commands/{cmd['id']}", local=True))[2]["status"] == "approved"


async def test_the_creator_of_a_command_may_cancel_its_request(api: Api) -> None:
    uid, _user = await api.user("beneficiary-2")
    _p, approver = await api.user("approver-5", "approver")
    _, _, cmd = await api.call(
        "POST",
        "/commands",
        token=approver,
        json={"action": "transfer", "riskScore": 80, "userId": uid},
    )
    status, _h, cancelled = await api.call(
        "PUT", f"/approvals/{cmd['approvalId']}/cancel", token=approver
    )
    assert (status, cancelled["status"]) == (200, "cancelled")


# --- bad input never answers 5xx -----------------------------------------------------------------------


async def test_invalid_utf8_in_a_json_body_is_400(api: Api) -> None:
    _a, agent = await api.user("utf8-agent", "agent")
    for path in ("/commands", "/cache/set", "/sessions", "/approvals", "/auth/login"):
        status, headers, problem = await api.call(
            "POST",
            path,
            token=agent,
            data=b'{"action": "\xff\xfe", "key": "\xc3\x28"}',
            headers={"Content-Type": "application/json"},
        )
        assert status == 400, path
        assert headers["Content-Type"] == "application/problem+json"
        assert "UTF-8" in problem["detail"]


async def test_deeply_nested_json_is_400_and_stores_nothing(api: Api) -> None:
    _a, agent = await api.user("nest-agent", "agent")
    for depth in (65, 1000, 100_000):
        nested = "[" * depth + "]" * depth
        data = f'{{"action": "x", "parameters": {{"p": {nested}}}}}'.encode()
        status, _h, problem = await api.call(
            "POST",
            "/commands",
            token=agent,
            data=data,
            headers={"Content-Type": "application/json"},
        )
        assert status == 400, depth
        assert "nested" in problem["detail"]
    assert (await api.call("GET", "/commands", token=agent))[2]["items"] == []
    shallow = {"p": [[[[["ok"]]]]]}
    status, _h, _b = await api.call(
        "POST", "/commands", token=agent, json={"action": "x", "parameters": shallow}
    )
    assert status == 201


async def test_references_to_rows_that_do_not_exist_are_404(api: Api) -> None:
    _a, agent = await api.user("ref-agent", "agent")
    status, _h, problem = await api.call(
        "POST", "/commands", token=agent, json={"action": "x", "userId": 999_999}
    )
    assert status == 404, problem
    status, _h, _b = await api.call("POST", "/sessions", token=agent, json={"userId": 999_999})
    assert status == 404
    status, _h, _b = await api.call("POST", "/users/999999/tokens", local=True, json={})
    assert status == 404
    for path in ("/commands/999999", "/approvals/999999", "/users/999999"):
        assert (await api.call("GET", path, local=True))[0] == 404, path
    assert (await api.call("GET", "/commands/99999999999999999999", local=True))[0] == 404


async def test_out_of_range_numbers_are_400_never_500(api: Api) -> None:
    _a, agent = await api.user("num-agent", "agent")
    uid, user = await api.user("num-user")
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/commands", {"action": "x", "userId": 2**63}),
        ("POST", "/commands", {"action": "x", "userId": -1}),
        ("POST", "/commands", {"action": "x", "riskScore": 2**70}),
        ("POST", "/sessions", {"userId": uid, "idleTtl": 2**63}),
        ("POST", "/sessions", {"userId": uid, "absoluteTtl": 2**63}),
        ("POST", "/sessions", {"userId": 2**64}),
        ("POST", "/cache/set", {"key": "k", "value": 1, "ttl": 1e300}),
        ("POST", "/cache/set", {"key": "k", "value": 1e400}),
        ("POST", "/approvals", {"action": "x", "riskScore": 50, "expiresIn": 2**63}),
        ("POST", f"/users/{uid}/tokens", {"expiresIn": 2**63}),
    ]
    for method, path, body in cases:
        token = user if path.startswith("/users") else agent
        status, _h, problem = await api.call(method, path, token=token, json=body)
        assert status == 400, (path, body, problem)
    for query in ("userId=9223372036854775808", "riskScoreMin=32768", "limit=99999999999999999999"):
        assert (await api.call("GET", f"/commands?{query}", token=agent))[0] == 400, query


async def test_a_session_ttl_of_2_pow_63_leaves_no_unexpiring_key_and_logins_keep_working(
    api: Api, raw: aioredis.Redis, redis_prefix: str
) -> None:
    uid, user = await api.user("ttl-user", password="long password 3")
    status, _h, _b = await api.call(
        "POST", "/sessions", token=user, json={"userId": uid, "idleTtl": 2**63}
    )
    assert status == 400
    async for key in raw.scan_iter(match=f"{redis_prefix}*"):
        if await raw.type(key) != b"stream":  # the bus's inbox is trimmed, not expired
            assert await raw.pttl(key) > 0, key  # every other key expires
    await login(api, "ttl-user", "long password 3")


async def test_http_parser_errors_are_a_400_logged_in_one_line_without_a_traceback(
    api: Api, log_lines: io.StringIO
) -> None:
    for payload in (
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ):
        answer = await raw_http(api, payload)
        head, _, _body = answer.partition(b"\r\n\r\n")
        assert head.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), answer
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    bad = [e for e in lines if e["event"] == "http_bad_request"]
    assert len(bad) == 4
    assert not any("exception" in e or "Traceback" in json.dumps(e) for e in lines)


# --- no token or session id in any log line ------------------------------------------------------------


async def test_no_token_or_session_id_reaches_a_log_line(api: Api, log_lines: io.StringIO) -> None:
    uid, token = await api.user("secretive", password="long password 4")
    session = await login(api, "secretive", "long password 4")
    _a, agent = await api.user("svc-2", "agent")
    _s, _h, app_session = await api.call("POST", "/sessions", token=agent, json={"userId": uid})
    secrets = [token, session, app_session["id"], token[3:], session[:20]]
    payloads = [
        f"GET /users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\x01\r\n\r\n".encode(),
        f"GET /users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {session}\x7f\r\n\r\n".encode(),
        f"GET /sessions/{app_session['id']}\x00 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"GET /x HTTP/1.1\r\n{token}\r\n\r\n".encode(),
        f"{session} / HTTP/1.1\r\n\r\n".encode(),
    ]
    for payload in payloads:
        await raw_http(api, payload)
    for header in (f"Bearer {token}\t", f"Basic {token}", f"Bearer {session} {token}"):
        await api.call("GET", "/users", headers={"Authorization": header})
    await api.call("GET", f"/sessions/{app_session['id']}", token="bogus-" + session)
    await api.call("POST", "/auth/logout", token=token)
    text = log_lines.getvalue()
    assert text  # the bad requests were logged ...
    for secret in secrets:
        assert secret not in text  # ... without what was in them


# --- bounded whatever names clients send ---------------------------------------------------------------


@pytest.mark.parametrize("config_overrides", [{"cache": {"max_namespaces": 8}}])
async def test_stats_and_metrics_stay_bounded_whatever_namespaces_and_methods_clients_send(
    api: Api,
) -> None:
    _a, agent = await api.user("ns-agent", "agent")
    for i in range(40):
        await api.call("GET", f"/cache/get/k?namespace=ns{i}", token=agent)
        await api.call(
            "POST", "/cache/set", token=agent, json={"namespace": f"w{i}", "key": "k", "value": i}
        )
    async with aiohttp.ClientSession() as s:
        for method in ("PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "REPORT", "PURGE", "VERB1"):
            async with s.request(method, api.base + "/health/live") as resp:
                assert resp.status in (400, 405)  # the parser refuses methods it does not know
    _s, _h, stats = await api.call("GET", "/cache/stats", token=agent)
    assert len(stats) <= 9  # 8 namespaces, and "(other)" for the rest
    assert (
        stats["(other)"]["sets"] + sum(s["sets"] for ns, s in stats.items() if ns != "(other)")
        == 40
    )
    _s, _h, text = await api.r.get("/metrics")
    namespaces = set(re.findall(r'namespace="([^"]*)"', text))
    assert len(namespaces) <= 9
    assert "w39" not in namespaces
    assert "PROPFIND" not in text
    assert "VERB" not in text
    assert 'method="other"' in text


# --- token scopes, password changes, lifetimes ---------------------------------------------------------------


async def test_token_scopes_are_refused_at_creation(api: Api) -> None:
    uid, token = await api.user("scoped")
    status, _h, problem = await api.call(
        "POST", f"/users/{uid}/tokens", token=token, json={"name": "ro", "scopes": ["read"]}
    )
    assert status == 400
    assert "scopes" in problem["detail"]
    _s, _h, listed = await api.call("GET", f"/users/{uid}/tokens", token=token)
    assert [t["name"] for t in listed] == ["test"]
    assert all("scopes" not in t for t in listed)


async def test_changing_a_password_needs_the_current_one_except_an_admin_resetting_another(
    api: Api,
) -> None:
    uid, token = await api.user("pw-user", password="first password")
    url = f"/users/{uid}"
    status, _h, problem = await api.call(
        "PUT", url, token=token, json={"password": "second password"}
    )
    assert status == 403
    assert "currentPassword" in problem["detail"]
    status, _h, _b = await api.call(
        "PUT",
        url,
        token=token,
        json={"password": "second password", "currentPassword": "wrong one"},
    )
    assert status == 403
    await login(api, "pw-user", "first password")
    status, _h, _b = await api.call(
        "PUT",
        url,
        token=token,
        json={"password": "second password", "currentPassword": "first password"},
    )
    assert status == 200
    await login(api, "pw-user", "second password")
    # An admin resets someone else's without it.
    status, _h, _b = await api.call("PUT", url, local=True, json={"password": "third password"})
    assert status == 200
    await login(api, "pw-user", "third password")


@pytest.mark.parametrize(
    "config_overrides",
    [
        {
            "sessions": {"max_ttl": 120},
            "cache": {"max_ttl": 60},
            "approvals": {"max_expiry": 300},
            "auth": {"token_max_ttl": 3600},
        }
    ],
)
async def test_client_chosen_lifetimes_are_capped_by_config(
    api: Api, raw: aioredis.Redis, redis_prefix: str
) -> None:
    uid, token = await api.user("capped")
    _a, agent = await api.user("capper", "agent")
    now_ms = time.time() * 1000
    _s, _h, session = await api.call(
        "POST",
        "/sessions",
        token=agent,
        json={"userId": uid, "idleTtl": 10**8, "absoluteTtl": 10**8},
    )
    deadline = datetime.fromisoformat(session["expiresAt"]).timestamp() * 1000
    assert deadline <= now_ms + 125_000
    _s, _h, stored = await api.call(
        "POST", "/cache/set", token=agent, json={"key": "k", "value": 1, "ttl": 10**6}
    )
    assert stored["ttlMs"] == 60_000
    assert 0 < await raw.pttl(f"{redis_prefix}cache:default:k") <= 60_000
    _s, _h, approval = await api.call(
        "POST", "/approvals", token=token, json={"action": "x", "riskScore": 50, "expiresIn": 86400}
    )
    _s, _h, made = await api.call(
        "POST", f"/users/{uid}/tokens", token=token, json={"expiresIn": 10**8}
    )
    _s, _h, unlimited = await api.call("POST", f"/users/{uid}/tokens", token=token, json={})

    def seconds_left(iso: str) -> float:
        return datetime.fromisoformat(iso).timestamp() - time.time()

    assert seconds_left(approval["expiresAt"]) <= 305
    assert seconds_left(made["info"]["expiresAt"]) <= 3605
    assert seconds_left(unlimited["info"]["expiresAt"]) <= 3605


# --- slow clients and logins -----------------------------------------------------------------------


@pytest.mark.parametrize("config_overrides", [{"http": {"idle_timeout": 0.5}}])
async def test_an_incomplete_request_is_closed_after_the_idle_timeout(api: Api) -> None:
    started = time.monotonic()
    answer = await raw_http(api, b"GET /health/live HTTP/1.1\r\nHost: x\r\n", read_timeout=5)
    assert answer == b""  # closed without a response
    assert time.monotonic() - started < 4
    # A complete request on a fresh connection is served as usual.
    answer = await raw_http(
        api, b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("config_overrides", [{"http": {"request_timeout": 2}}])
async def test_a_body_that_never_arrives_is_a_408_and_frees_its_place(api: Api) -> None:
    _uid, token = await api.user("slow-body", "agent")
    head = (
        f"POST /cache/set HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n"
    )
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", api.r.daemon.http.bound_port)
    try:
        writer.write(head.encode() + b'{"key": ')
        async with asyncio.timeout(5):
            answer = await reader.readuntil(b"}")  # the problem document, whole
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within 2 s" in answer
    assert time.monotonic() - started < 8
    app = api.r.daemon.http.app
    assert app is not None
    assert app[HTTP_METRICS].admitted == 0


async def _unread(api: Api, payload: bytes, *, server_sndbuf: int | None = None) -> socket.socket:
    """A connection with a small receive buffer that sends ``payload`` and
    never reads; ``server_sndbuf`` shrinks the daemon's side of it too (a
    slow link: the kernel takes little of an answer)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", api.r.daemon.http.bound_port or 0))
    if server_sndbuf is not None:
        # A first small request makes the connection known to the daemon
        # (its answer waits, unread, in this socket's buffer).
        await loop.sock_sendall(sock, b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        app = api.r.daemon.http.app
        assert app is not None
        async with asyncio.timeout(5):
            while True:
                ours = [
                    t.get_extra_info("socket")
                    for t in list(app[TRANSPORTS])
                    if t.get_extra_info("peername") == sock.getsockname()
                ]
                if ours:
                    break
                await asyncio.sleep(0.01)
        ours[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_sndbuf)
    await loop.sock_sendall(sock, payload)
    return sock


def _unsent(api: Api) -> list[int]:
    """Bytes waiting to be sent, per connection that has some."""
    app = api.r.daemon.http.app
    assert app is not None
    sizes = []
    for transport in list(app[TRANSPORTS]):
        if transport.get_write_buffer_size() > 0:
            sizes.append(transport.get_write_buffer_size())
    return sizes


async def _closed_for_stalling(api: Api, before: int) -> float:
    app = api.r.daemon.http.app
    assert app is not None
    started = time.monotonic()
    async with asyncio.timeout(10):
        while app[HTTP_METRICS].stalled_closed == before:
            await asyncio.sleep(0.05)
    assert not _unsent(api)
    return time.monotonic() - started


@pytest.mark.parametrize("config_overrides", [{"http": {"idle_timeout": 1}}])
async def test_a_peer_that_reads_nothing_is_closed_after_the_idle_timeout(api: Api) -> None:
    """Pipelined requests whose answers are never read: the socket's buffers
    fill and the handler waits to write; the connection is aborted once its
    unsent bytes have not gone down for http.idle_timeout."""
    sock = await _unread(api, b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 500)
    try:
        assert 0.9 <= await _closed_for_stalling(api, 0) < 5
        status, _ctype, text = await api.r.get("/metrics")
        assert status == 200
        assert "jarvisd_http_stalled_closed_total 1" in text
    finally:
        sock.close()


@pytest.mark.parametrize("config_overrides", [{"http": {"idle_timeout": 1}}])
async def test_an_answer_left_unread_on_a_closed_connection_does_not_stay_for_ever(
    api: Api,
) -> None:
    """One answer, smaller than what makes aiohttp wait, on a connection it
    then closes (Connection: close): the transport would wait for ever for
    its buffer to empty; it is aborted after http.idle_timeout."""
    _uid, token = await api.user("unread", "agent")
    value = "x" * 40_000  # under the 64 kB past which aiohttp waits for the peer
    status, _h, _b = await api.call(
        "POST", "/cache/set", token=token, json={"key": "big", "value": value}
    )
    assert status == 200
    app = api.r.daemon.http.app
    assert app is not None
    before = app[HTTP_METRICS].stalled_closed
    request = (
        f"GET /cache/get/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    )
    sock = await _unread(api, request.encode(), server_sndbuf=4096)
    try:
        async with asyncio.timeout(5):  # answered, closed by aiohttp, bytes left
            while not _unsent(api):
                await asyncio.sleep(0.01)
        assert 0.5 <= await _closed_for_stalling(api, before) < 5
    finally:
        sock.close()


@pytest.mark.parametrize(
    "config_overrides",
    [{"auth": {"login_failures_per_user": 3, "login_failures_per_address": 6}}],
)
async def test_login_is_rate_limited_per_user_and_per_address(api: Api) -> None:
    await api.user("target", password="right password")
    await api.user("bystander", password="right password")
    for _ in range(3):
        status, _h, _b = await api.call(
            "POST", "/auth/login", json={"username": "target", "password": "wrong password"}
        )
        assert status == 401
    status, headers, problem = await api.call(
        "POST", "/auth/login", json={"username": "target", "password": "right password"}
    )
    assert status == 429  # even the right password, while the user is throttled
    assert int(headers["Retry-After"]) >= 1
    assert problem["status"] == 429
    # Another user from the same address may still log in, until the address's limit.
    await login(api, "bystander", "right password")
    for i in range(3):
        await api.call(
            "POST", "/auth/login", json={"username": f"ghost{i}", "password": "nope nope"}
        )
    status, _h, _b = await api.call(
        "POST", "/auth/login", json={"username": "bystander", "password": "right password"}
    )
    assert status == 429


async def test_a_login_does_the_same_work_whether_the_user_exists_or_has_a_password(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What makes a login take the same time in every case: one scrypt run,
    with the same cost, whether the user exists, has a password or not. The
    runs are counted, not timed (a timing on a shared machine proves little)."""
    await api.user("has-password", password="right password")
    await api.user("no-password")
    runs: list[tuple[int, int, int, int]] = []
    real = hashlib.scrypt

    def counted(password: bytes, *, salt: bytes, n: int, r: int, p: int, **kw: Any) -> bytes:
        runs.append((n, r, p, kw.get("dklen", 64)))
        return real(password, salt=salt, n=n, r=r, p=p, **kw)

    monkeypatch.setattr(credentials.hashlib, "scrypt", counted)
    costs = {}
    for username in ("has-password", "no-such-user", "no-password"):
        runs.clear()
        status, _h, _b = await api.call(
            "POST", "/auth/login", json={"username": username, "password": "wrong password"}
        )
        assert status == 401
        assert len(runs) == 1, (username, runs)
        costs[username] = runs[0]
    assert len(set(costs.values())) == 1, costs
    assert costs["has-password"][0] >= 2**14


# --- found by probing: each closed --------------------------------------------------------------


@pytest.mark.parametrize("config_overrides", [{"approvals": {"default_score": 30}}])
async def test_the_risk_policy_scores_commands_and_a_suggestion_only_raises_it(api: Api) -> None:
    _u, user = await api.user("policy-user")
    cases = [
        ({"action": "delete_file"}, 80, "awaiting_approval"),
        ({"action": "delete_file", "riskScore": 0}, 80, "awaiting_approval"),
        ({"action": "rm"}, 90, "awaiting_approval"),
        ({"action": "Shell_Exec"}, 95, "awaiting_approval"),
        ({"action": "open_app"}, 30, "approved"),
        ({"action": "open_app", "riskScore": 92}, 92, "awaiting_approval"),
    ]
    for body, score, status in cases:
        code, _h, cmd = await api.call("POST", "/commands", token=user, json=body)
        assert code == 201, cmd
        assert (cmd["riskScore"], cmd["status"]) == (score, status), body
    _s, _h, standalone = await api.call(
        "POST", "/approvals", token=user, json={"action": "transfer_funds", "riskScore": 10}
    )
    assert standalone["riskScore"] == 85


async def test_the_local_admin_decides_requests_but_makes_none_and_is_named_as_decider(
    api: Api,
) -> None:
    for path, body in (
        ("/commands", {"action": "x"}),
        ("/approvals", {"action": "x", "riskScore": 80}),
    ):
        status, _h, problem = await api.call("POST", path, local=True, json=body)
        assert status == 403, path
        assert "local admin" in problem["detail"]
    _u, user = await api.user("asks-for-it")
    _, _, cmd = await api.call(
        "POST", "/commands", token=user, json={"action": "x", "riskScore": 95}
    )
    status, _h, decided = await api.call(
        "PUT", f"/approvals/{cmd['approvalId']}/approve", local=True
    )
    assert status == 200
    assert decided["decidedBy"] is None
    assert decided["decider"].startswith("uid:")


async def test_a_request_id_belongs_to_its_sender_and_tells_nothing_of_the_others(
    api: Api,
) -> None:
    u1, first = await api.user("rid-one")
    _u2, second = await api.user("rid-two")
    _a, agent = await api.user("rid-agent", "agent")
    _, _, mine = await api.call(
        "POST", "/commands", token=first, json={"action": "ls", "requestId": "job-42"}
    )
    assert mine["sender"] == "user:rid-one"
    # Someone else's "job-42" is a command of their own: no conflict, nothing shared.
    for token, body in (
        (second, {"action": "ls", "requestId": "job-42"}),
        (agent, {"action": "rm", "requestId": "job-42", "userId": u1, "riskScore": 99}),
    ):
        status, _h, theirs = await api.call("POST", "/commands", token=token, json=body)
        assert status == 201, theirs
        assert theirs["id"] != mine["id"]
    # The same caller repeating the same command is the idempotent replay;
    # its own requestId reused for something else is its own conflict.
    status, _h, again = await api.call(
        "POST", "/commands", token=first, json={"action": "ls", "requestId": "job-42"}
    )
    assert (status, again["id"]) == (200, mine["id"])
    status, _h, problem = await api.call(
        "POST", "/commands", token=first, json={"action": "cat", "requestId": "job-42"}
    )
    assert status == 409
    assert "another of your commands" in problem["detail"]
    assert "current" not in problem


async def test_deciding_while_the_command_is_cancelled_never_deadlocks(api: Api) -> None:
    uid, _user = await api.user("racer")
    _p, approver = await api.user("racer-approver", "approver")
    _a, agent = await api.user("racer-agent", "agent")
    for _ in range(15):
        _, _, cmd = await api.call(
            "POST",
            "/commands",
            token=agent,
            json={"action": "x", "riskScore": 80, "userId": uid},
        )
        results = await asyncio.gather(
            api.call("PUT", f"/approvals/{cmd['approvalId']}/approve", token=approver),
            api.call("PUT", f"/commands/{cmd['id']}", token=agent, json={"status": "cancelled"}),
        )
        assert sorted(r[0] for r in results) in ([200, 200], [200, 409]), results
        _s, _h, final = await api.call("GET", f"/commands/{cmd['id']}", local=True)
        _s, _h, approval = await api.call("GET", f"/approvals/{cmd['approvalId']}", local=True)
        assert (final["status"], approval["status"]) in (
            ("cancelled", "cancelled"),  # cancelled first: the request went with it
            ("approved", "approved"),  # approved first: the cancel came too late (409)
            ("cancelled", "approved"),  # approved first, then the approved command cancelled
        )


async def test_a_client_leaving_mid_body_or_a_bad_encoding_logs_no_body_and_answers_4xx(
    api: Api, log_lines: io.StringIO
) -> None:
    secret = "LEAKY-PASSWORD-123"
    cut = (
        "POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f'Content-Length: 200\r\n\r\n{{"username": "u1", "password": "{secret}"'
    ).encode()
    port = api.r.daemon.http.bound_port
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(cut)
    await writer.drain()
    writer.close()
    body = f'{{"username": "u1", "password": "{secret}"}}'.encode()
    status, _h, problem = await api.call(
        "POST",
        "/auth/login",
        data=body,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert status == 400, problem
    await asyncio.sleep(0.3)  # the cut request's handler finishes
    text = log_lines.getvalue()
    assert secret not in text
    assert "http_handler_failed" not in text


async def test_a_body_that_is_not_utf8_json_is_415(api: Api) -> None:
    _a, agent = await api.user("ctype-agent", "agent")
    for ctype in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json; charset=utf-16",
    ):
        status, _h, problem = await api.call(
            "POST",
            "/commands",
            token=agent,
            data=b'{"action": "x"}',
            headers={"Content-Type": ctype},
        )
        assert status == 415, ctype
        assert problem["status"] == 415
    assert (await api.call("GET", "/commands", token=agent))[2]["items"] == []


async def test_a_login_racing_a_password_change_keeps_no_session(api: Api) -> None:
    uid, _t = await api.user("racing-login", password="old password 1")
    for round_ in range(6):
        logins = [
            api.call(
                "POST",
                "/auth/login",
                json={"username": "racing-login", "password": f"old password {round_ + 1}"},
            )
            for _ in range(8)
        ]
        change = api.call(
            "PUT", f"/users/{uid}", local=True, json={"password": f"old password {round_ + 2}"}
        )
        results = await asyncio.gather(change, *logins)
        tokens = [r[2]["token"] for r in results[1:] if r[0] == 201]
        for token in tokens:  # whatever got out before the change must be dead now
            assert (await api.call("GET", f"/users/{uid}", token=token))[0] == 401


@pytest.mark.parametrize("config_overrides", [{"auth": {"max_tokens_per_user": 3}}])
async def test_a_user_holds_a_bounded_number_of_live_tokens(api: Api) -> None:
    uid, token = await api.user("many-tokens")  # holds one already
    made = []
    for _ in range(2):
        status, _h, t = await api.call("POST", f"/users/{uid}/tokens", token=token, json={})
        assert status == 201
        made.append(t)
    status, _h, problem = await api.call("POST", f"/users/{uid}/tokens", token=token, json={})
    assert status == 409
    assert "max_tokens_per_user" in problem["detail"]
    await api.call("DELETE", f"/users/{uid}/tokens/{made[0]['info']['id']}", token=token)
    assert (await api.call("POST", f"/users/{uid}/tokens", token=token, json={}))[0] == 201


async def test_cache_query_parameters_are_given_once_and_flags_are_flags(api: Api) -> None:
    _a, agent = await api.user("flags-agent", "agent")
    await api.call(
        "POST", "/cache/set", token=agent, json={"key": "k", "value": 1, "namespace": "a"}
    )
    assert (await api.call("GET", "/cache/get/k?namespace=a&namespace=default", token=agent))[
        0
    ] == 400
    assert (await api.call("GET", "/cache/get/k?namespace=a&raw=maybe", token=agent))[0] == 400
    assert (await api.call("GET", "/cache/get/k?namespace=a&raw", token=agent))[0] == 200
    status, _h, stored = await api.call(
        "POST", "/cache/set", token=agent, json={"key": "new", "value": 1, "ttl": "keep"}
    )
    assert status == 200
    assert stored["ttlMs"] is None
    _s, _h, _b = await api.call("GET", "/cache/get/new", token=agent)
