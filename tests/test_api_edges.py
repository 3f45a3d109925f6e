"""The API as a newcomer meets it: a root that says where to go, one JSON
style, one way to write times, and errors that say what to send."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from config import ConfigError, LoadedConfig, load_settings
from tests.test_api import Api, serve_api


@pytest.fixture
async def api(make_config: Callable[..., LoadedConfig]) -> AsyncIterator[Api]:
    async for client in serve_api(make_config()):
        yield client


async def raw(api: Api, path: str) -> tuple[int, bytes]:
    async with api.unix.get("http://localhost" + path) as resp:
        return resp.status, await resp.read()


async def test_the_root_says_what_this_is_and_where_to_go(api: Api) -> None:
    status, _h, doc = await api.call("GET", "/")
    assert status == 200
    assert doc["service"] == "jarvisd"
    assert doc["links"]["openapi"] == "/openapi.json"
    for name in ("openapi", "health", "live", "metrics"):
        linked, _h, _doc = await api.call("GET", doc["links"][name])
        assert linked == 200, name
    described, _h, spec = await api.call("GET", "/openapi.json")
    assert described == 200
    assert "/" in spec["paths"]


async def test_lists_built_by_postgresql_are_as_compact_as_every_other_answer(api: Api) -> None:
    await api.user("compact-a")
    await api.user("compact-b")
    status, body = await raw(api, "/users?limit=5")
    assert status == 200, body
    assert b'" : ' not in body
    assert b", " not in body.replace(b'", "', b"")  # no space after a separator
    assert body.startswith(b'{"items":[{"id":')


async def test_login_and_sessions_give_times_in_rfc_3339(api: Api) -> None:
    uid, agent = await api.user("timely", "agent", password="a long password")
    status, _h, login = await api.call(
        "POST", "/auth/login", json={"username": "timely", "password": "a long password"}
    )
    assert status == 201, login
    assert "expiresAtMs" not in login
    deadline = datetime.fromisoformat(login["expiresAt"])
    assert deadline.tzinfo is not None
    assert deadline > datetime.now(UTC)
    status, _h, session = await api.call(
        "POST", "/sessions", token=agent, json={"userId": uid, "data": {"a": 1}}
    )
    assert status == 201, session
    assert {"createdMs", "lastSeenMs", "expiresAtMs"}.isdisjoint(session)
    created = datetime.fromisoformat(session["createdAt"])
    assert created <= datetime.fromisoformat(session["lastSeenAt"])
    assert datetime.fromisoformat(session["expiresAt"]) > created
    status, _h, read = await api.call("GET", f"/sessions/{session['id']}", token=agent)
    assert status == 200, read
    assert read["expiresAt"] == session["expiresAt"]


async def test_a_bearer_that_is_not_a_token_or_session_is_named_as_such(api: Api) -> None:
    status, _h, problem = await api.call("GET", "/users/1", token="not-a-thing")
    assert status == 401
    assert (
        "not a valid API token (they start with jv_) or a live login session" in (problem["detail"])
    )
    status, _h, problem = await api.call("GET", "/users/1", token="jv_" + "x" * 40)
    assert status == 401
    assert "token" in problem["detail"]
    assert "session" not in problem["detail"]


async def test_errors_say_what_to_send(api: Api) -> None:
    _uid, asker = await api.user("asker-edges")
    status, _h, made = await api.call(
        "POST", "/commands", token=asker, json={"action": "delete_file"}
    )
    assert status == 201, made
    status, _h, problem = await api.call(
        "PUT", f"/approvals/{made['approvalId']}/reject", local=True
    )
    assert status == 400
    assert problem["detail"].startswith("reason is required")
    status, _h, problem = await api.call(
        "POST", "/users", local=True, json={"username": "shorty", "password": "short"}
    )
    assert status == 400
    assert problem["detail"] == "password: must be at least 8 characters long"
    status, _h, problem = await api.call(
        "POST", "/users", local=True, json={"username": "roles", "role": "boss"}
    )
    assert status == 400
    assert problem["detail"].startswith("role: 'boss' is not one of")
    status, _h, problem = await api.call("POST", "/users", local=True, json={"username": 7})
    assert status == 400
    assert problem["detail"] == "username: must be a string, not an integer"


def test_a_setting_with_a_wrong_value_lists_the_values_it_takes(tmp_path: Path) -> None:
    path = tmp_path / "jarvisd.toml"
    path.write_text('[daemon]\nlog_level = "verbose"\n[embedded]\nenabled = true\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    (issue,) = caught.value.issues
    assert "daemon.log_level" in str(issue)
    assert "'verbose' is not one of 'debug', 'info', 'warning', 'error', 'critical'" in str(issue)
