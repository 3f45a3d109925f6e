"""Cache and session routes over HTTP, with auth, validation and problem errors."""

from __future__ import annotations

import pytest

from tests.servers import SINGLE_AND_CLUSTER, redis_url_for
from tests.test_api import Api, api  # noqa: F401 - the fixture


@pytest.fixture(params=SINGLE_AND_CLUSTER)
def redis_url(request: pytest.FixtureRequest) -> str:
    """Every test here runs on one server and again on a Redis Cluster."""
    return redis_url_for(request)


pytestmark = pytest.mark.usefixtures("api")


async def test_cache_routes_round_trip_with_ttl_tags_and_namespaces(api: Api) -> None:  # noqa: F811
    _a, agent = await api.user("cache-agent", "agent")
    status, _h, stored = await api.call(
        "POST",
        "/cache/set",
        token=agent,
        json={
            "key": "weather:paris",
            "value": {"temp": 11},
            "ttl": 1.5,
            "tags": ["weather"],
            "namespace": "svc",
        },
    )
    assert (status, stored["stored"]) == (200, True)
    status, _h, got = await api.call("GET", "/cache/get/weather:paris?namespace=svc", token=agent)
    assert (status, got["value"], got["hit"]) == (200, {"temp": 11}, True)
    assert (await api.call("GET", "/cache/get/weather:paris", token=agent))[
        0
    ] == 404  # other namespace
    status, _h, nx = await api.call(
        "POST",
        "/cache/set",
        token=agent,
        json={"key": "weather:paris", "value": 1, "mode": "NX", "namespace": "svc"},
    )
    assert (status, nx["stored"]) == (200, False)
    assert (await api.call("GET", "/cache/exists/weather:paris?namespace=svc", token=agent))[2] == {
        "exists": True
    }
    status, _h, inv = await api.call(
        "POST", "/cache/invalidate", token=agent, json={"namespace": "svc", "tags": ["weather"]}
    )
    assert (status, inv["invalidated"]) == (200, 1)
    assert (await api.call("GET", "/cache/exists/weather:paris?namespace=svc", token=agent))[2] == {
        "exists": False
    }
    for i in range(5):
        await api.call(
            "POST", "/cache/set", token=agent, json={"key": f"k{i}", "value": i, "namespace": "svc"}
        )
    status, _h, inv = await api.call(
        "POST", "/cache/invalidate", token=agent, json={"namespace": "svc", "pattern": "k[0-2]"}
    )
    assert inv["invalidated"] == 3
    assert (await api.call("DELETE", "/cache/k3?namespace=svc", token=agent))[2] == {"deleted": 1}
    status, _h, flushed = await api.call("DELETE", "/cache?namespace=svc", token=agent)
    assert flushed["flushed"] == 1
    status, _h, stats = await api.call("GET", "/cache/stats?namespace=svc", token=agent)
    assert status == 200
    assert stats["svc"]["nxRefused"] == 1
    assert stats["svc"]["hits"] >= 1


async def test_cache_routes_reject_bad_input_with_problems(api: Api) -> None:  # noqa: F811
    _a, agent = await api.user("cache-agent2", "agent")
    cases = [
        ({"key": "", "value": 1}, 400),
        ({"key": "k", "value": 1, "mode": "NXX"}, 400),
        ({"key": "k", "value": 1, "ttl": "forever"}, 400),
        ({"key": "k", "value": 1, "ttl": -1}, 400),
        ({"key": "k", "value": 1, "ttl": 2**63}, 400),
        ({"key": "k", "value": 1, "namespace": "bad ns"}, 400),
        ({"key": "k", "value": 1, "extra": True}, 400),
        ({"key": "k" * 2000, "value": 1}, 400),
        ({"key": "k", "value": 1, "tags": [f"t{i}" for i in range(65)]}, 400),
        ({"key": "k", "value": "x" * 1_000_100}, 413),
    ]
    for payload, expected in cases:
        status, headers, problem = await api.call("POST", "/cache/set", token=agent, json=payload)
        assert status == expected, (payload, problem)
        assert headers["Content-Type"] == "application/problem+json"
    assert (
        await api.call(
            "POST", "/cache/invalidate", token=agent, json={"tags": ["a"], "namespace": "no way"}
        )
    )[0] == 400
    assert (await api.call("GET", "/cache/get/k?nope=1", token=agent))[0] == 400


async def test_cache_routes_need_an_allowed_role(api: Api) -> None:  # noqa: F811
    _u, user = await api.user("plain-user")
    _p, approver = await api.user("an-approver", "approver")
    assert (await api.call("GET", "/cache/get/k"))[0] == 401
    assert (await api.call("POST", "/cache/set", token=user, json={"key": "k", "value": 1}))[
        0
    ] == 403
    assert (await api.call("GET", "/cache/stats", token=approver))[0] == 200
    assert (await api.call("DELETE", "/cache", token=approver))[0] == 403


async def test_session_routes_create_read_update_and_delete(api: Api) -> None:  # noqa: F811
    uid, user = await api.user("sess-user")
    _a, agent = await api.user("web-ui", "agent")
    other, _ = await api.user("sess-other")
    status, _h, made = await api.call(
        "POST", "/sessions", token=agent, json={"userId": uid, "data": {"cart": []}}
    )
    assert status == 201
    sid = made["id"]
    status, _h, got = await api.call("GET", f"/sessions/{sid}", token=user)
    assert (status, got["data"], got["version"], "id" in got) == (200, {"cart": []}, 1, False)
    status, _h, upd = await api.call(
        "PUT", f"/sessions/{sid}", token=agent, json={"data": {"cart": [1]}, "version": 1}
    )
    assert (status, upd["version"]) == (200, 2)
    status, _h, conflict = await api.call(
        "PUT", f"/sessions/{sid}", token=agent, json={"data": {}, "version": 1}
    )
    assert (status, conflict["currentVersion"]) == (409, 2)
    assert (await api.call("POST", "/sessions", token=user, json={"userId": other}))[0] == 403
    _o, other_token = await api.user("sess-third")
    assert (await api.call("GET", f"/sessions/{sid}", token=other_token))[0] == 404
    assert (await api.call("DELETE", f"/sessions/{sid}", token=user))[0] == 204
    assert (await api.call("GET", f"/sessions/{sid}", token=agent))[0] == 404
    assert (await api.call("PUT", f"/sessions/{sid}", token=agent, json={"data": {}}))[0] == 404
