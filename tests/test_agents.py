"""Agents are untrusted: each is a Redis user of its own that may append to
its own inbox and nothing else of the daemon's; the sender of an envelope is
the inbox it came from. Each attack below is run with the agent's real
credentials against the real Redis (or Redis Cluster), and refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from actors.redis_link import RedisClient, connect_redis
from config import LoadedConfig
from tests.servers import SINGLE_AND_CLUSTER, delete_acl_users, redis_url_for, unlink_prefix
from tests.test_api import Api, serve_api
from tests.test_bus import eventually
from tests.test_http import start_daemon

FAST = {"claim_interval": 0.2, "claim_idle": 0.3, "block_ms": 100}
# What a client with no (or revoked) credentials meets: a cluster client
# reports that it found no node it could log in to.
REFUSED = (AuthenticationError, RedisConnectionError, ResponseError, RedisClusterException)


@pytest.fixture(params=SINGLE_AND_CLUSTER)
def redis_url(request: pytest.FixtureRequest) -> str:
    return redis_url_for(request)


@pytest.fixture
def bus_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def api(
    make_config: Callable[..., LoadedConfig], bus_overrides: dict[str, Any]
) -> AsyncIterator[Api]:
    loaded = make_config(bus={**FAST, **bus_overrides})
    async for client in serve_api(loaded):
        yield client


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()


class Agent:
    """An agent as it runs: its Redis URL and names from ``POST /agents``."""

    def __init__(self, made: dict[str, Any]) -> None:
        self.made = made
        self.name: str = made["agent"]["name"]
        self.inbox: str = made["agent"]["inbox"]
        self.replies: str = made["agent"]["replies"]
        self.url: str = made["redisUrl"]
        self.clients: list[RedisClient] = []

    def client(self) -> RedisClient:
        made = connect_redis(self.url, name=f"agent-{self.name}", timeout=3)
        self.clients.append(made)
        return made

    async def close(self) -> None:
        for c in self.clients:
            await c.aclose()


@pytest.fixture
async def agents(api: Api) -> AsyncIterator[Callable[[str], Any]]:
    made: list[Agent] = []

    async def add(name: str) -> Agent:
        status, _h, body = await api.call("POST", "/agents", local=True, json={"name": name})
        assert status == 201, body
        agent = Agent(body)
        made.append(agent)
        return agent

    yield add
    for agent in made:
        await agent.close()


def envelope(rid: str, kind: str = "command.requested", **data: Any) -> str:
    """An envelope whose ``source`` claims to be the admin: a label, never authority."""
    if kind == "command.requested":
        ident, body = rid, {"action": "open_app", **data}
    else:
        ident, body = f"{rid}-{uuid.uuid4().hex[:6]}", {"requestId": rid, **data}
    return json.dumps({"v": 1, "id": ident, "type": kind, "source": "admin", "data": body})


async def on_a_node(client: RedisClient, *args: str) -> Any:
    """A command with no key, on one node (a cluster client must be told which)."""
    if isinstance(client, RedisCluster):
        await client.initialize()
        return await client.execute_command(*args, target_nodes=client.get_random_node())
    return await client.execute_command(*args)


async def subscriber(client: RedisClient) -> Any:
    if isinstance(client, RedisCluster):
        await client.initialize()  # its pub/sub needs the slot map first
    return client.pubsub()


async def ping(url: str) -> bool:
    client = connect_redis(url, name="agent-ping", timeout=3)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


async def confirmations(listener: Any, n: int) -> int:
    """Read a pub/sub connection until ``n`` subscriptions are confirmed (a
    refused one raises its error here)."""
    seen = 0
    async with asyncio.timeout(5):
        while seen < n:
            msg = await listener.get_message(timeout=0.5)
            if msg is not None and msg["type"] == "subscribe":
                seen += 1
    return seen


async def commands(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT id, request_id, sender, created_by, status, action FROM commands ORDER BY id"
    )


async def test_an_agent_sends_on_its_own_inbox_and_is_the_sender_whatever_the_envelope_says(
    api: Api, agents: Any, db: asyncpg.Connection
) -> None:
    pc = await agents("pc-agent")
    assert pc.made["aclsManaged"] is True
    client = pc.client()
    await client.xadd(pc.inbox, {"envelope": envelope("pc-1")})

    async def both() -> bool:
        # The fire-and-forget path: a message published while the daemon's
        # subscription is being made again (a cluster's listener moving) is
        # lost by design, so it is sent until heard; its requestId makes it
        # one command however often it comes.
        await client.publish(pc.inbox, envelope("pc-2"))
        await asyncio.sleep(0.2)
        return len(await commands(db)) == 2

    await eventually(both)
    uid = pc.made["agent"]["userId"]
    for row in await commands(db):
        # "source": "admin" in the envelope is a label; the sender is the inbox.
        assert (row["sender"], row["created_by"]) == ("agent:pc-agent", uid)
    status, _h, listed = await api.call("GET", "/commands?sender=agent:pc-agent", local=True)
    assert status == 200
    assert {c["requestId"] for c in listed["items"]} == {"pc-1", "pc-2"}


async def test_an_agent_may_do_nothing_else_on_redis(
    api: Api, agents: Any, raw: RedisClient, redis_prefix: str
) -> None:
    mallory = await agents("mallory")
    other = await agents("other-agent")
    client = mallory.client()
    prefix = redis_prefix
    shared = api.r.daemon.settings.inbox
    # Somebody else's inbox, the shared inbox, and any key of the daemon's.
    for stream in (other.inbox, shared, f"{prefix}cache:default:x", f"{prefix}login:x"):
        with pytest.raises(NoPermissionError):
            await client.xadd(stream, {"envelope": envelope("x")})
    for read in (
        client.get(f"{prefix}cache:default:x"),
        client.hgetall(f"{prefix}login:{{abcd}}x"),
        client.keys("*"),
        client.xreadgroup("jarvisd", "me", {mallory.inbox: ">"}),
        client.xrange(mallory.inbox),
        client.execute_command("XGROUP", "DESTROY", mallory.inbox, "jarvisd"),
        on_a_node(client, "ACL", "SETUSER", "x", "on"),
        on_a_node(client, "CONFIG", "GET", "*"),
        client.flushall(),
    ):
        with pytest.raises(NoPermissionError):
            await read
    # The daemon's channels: events are read-only, internal ones unreachable.
    for channel in (f"{prefix}events", f"{prefix}approvals", f"{prefix}internal:principals"):
        with pytest.raises(NoPermissionError):
            await client.publish(channel, json.dumps({"type": "approval.decided"}))
    for channel in (other.inbox, shared, other.replies, f"{prefix}internal:principals"):
        with pytest.raises(NoPermissionError):
            await client.publish(channel, envelope("y"))
    # What it may: its own inbox, events, its replies, and pubsub.channels.
    assert await client.publish("user_activity", "hello") >= 0
    listener = await subscriber(client)
    await listener.subscribe(f"{prefix}events", mallory.replies, "user_activity")
    assert await confirmations(listener, 3) == 3
    await listener.subscribe(f"{prefix}internal:principals")
    with pytest.raises(NoPermissionError):
        await confirmations(listener, 1)
    await listener.aclose()
    assert await raw.xlen(other.inbox) == 0


async def test_a_request_id_a_user_took_first_leaves_the_agents_command_alone(
    api: Api, agents: Any, db: asyncpg.Connection
) -> None:
    pc = await agents("pc-agent")
    _u, user = await api.user("squatter")
    status, _h, theirs = await api.call(
        "POST", "/commands", token=user, json={"action": "open_app", "requestId": "pc-agent-42"}
    )
    assert (status, theirs["status"]) == (201, "approved")
    client = pc.client()
    await client.xadd(
        pc.inbox,
        {"envelope": envelope("pc-agent-42", action="transfer_funds", parameters={"eur": 900})},
    )
    await client.xadd(pc.inbox, {"envelope": envelope("pc-agent-42", "command.started")})

    async def two() -> bool:
        return len(await commands(db)) == 2

    await eventually(two)
    await asyncio.sleep(0.5)  # the report has been handled (or would have been)
    rows = {r["sender"]: r for r in await commands(db)}
    mine = rows["agent:pc-agent"]
    assert (mine["action"], mine["status"]) == ("transfer_funds", "awaiting_approval")
    # The user's command never saw the agent's report.
    assert rows["user:squatter"]["status"] == "approved"
    _s, _h, user_view = await api.call("GET", f"/commands/{theirs['id']}", token=user)
    assert user_view["startedAt"] is None


async def test_a_conflict_is_told_to_the_sender_on_its_replies_channel(
    api: Api, agents: Any, raw: RedisClient
) -> None:
    pc = await agents("pc-agent")
    client = pc.client()
    listener = await subscriber(client)
    await listener.subscribe(pc.replies)
    assert await confirmations(listener, 1) == 1
    await client.xadd(pc.inbox, {"envelope": envelope("dup-1")})
    await client.xadd(pc.inbox, {"envelope": envelope("dup-1", action="delete_file")})
    await client.xadd(pc.inbox, {"envelope": "not json"})
    told: list[dict[str, Any]] = []
    async with asyncio.timeout(15):
        while len(told) < 2:
            msg = await listener.get_message(ignore_subscribe_messages=True, timeout=1)
            if msg is not None:
                told.append(json.loads(msg["data"]))
    await listener.aclose()
    by_id = {t["id"]: t for t in told}
    assert {t["type"] for t in told} == {"envelope.refused"}
    assert "another of your commands" in by_id["dup-1"]["reason"]
    assert by_id[""]["reason"].startswith("malformed")
    dead = await raw.xrange(f"{api.r.daemon.settings.inbox}:dead")
    assert {f[b"inbox"].decode() for _i, f in dead} == {pc.inbox}


async def test_a_revoked_agent_is_disconnected_and_cannot_come_back(
    api: Api, agents: Any, db: asyncpg.Connection
) -> None:
    pc = await agents("pc-agent")
    client = pc.client()
    await client.xadd(pc.inbox, {"envelope": envelope("before-revoke")})
    listener = await subscriber(client)
    await listener.subscribe(pc.replies)
    status, _h, revoked = await api.call("DELETE", "/agents/pc-agent", local=True)
    assert status == 200, revoked
    assert revoked["agent"]["revokedAt"] is not None
    assert revoked["aclsManaged"] is True
    with pytest.raises(REFUSED):
        await ping(pc.url)
    # What it sent before was still handled.

    async def handled() -> bool:
        return [r["request_id"] for r in await commands(db)] == ["before-revoke"]

    await eventually(handled)
    _s, _h, listed = await api.call("GET", "/agents", local=True)
    assert [(a["name"], a["revokedAt"] is not None) for a in listed] == [("pc-agent", True)]
    await listener.aclose()
    # Given credentials again: a new password; the old URL stays dead.
    again = await agents("pc-agent")
    assert again.url != pc.url
    assert await again.client().ping()


async def test_the_shared_inbox_is_not_read_unless_the_operator_turns_it_on(
    api: Api, raw: RedisClient, db: asyncpg.Connection
) -> None:
    shared = api.r.daemon.settings.inbox
    await raw.xadd(shared, {"envelope": envelope("nobody-reads-this")})
    await asyncio.sleep(1.0)
    assert await commands(db) == []
    assert api.r.daemon.supervisor.get("bus").snapshot()["bus"]["sharedInbox"] is False


@pytest.mark.parametrize("bus_overrides", [{"manage_acls": False}])
async def test_where_the_daemon_may_not_manage_acls_it_prints_the_lines_that_work(
    api: Api, agents: Any, raw: RedisClient, db: asyncpg.Connection
) -> None:
    pc = await agents("by-hand")
    assert pc.made["aclsManaged"] is False
    setuser, aclfile = pc.made["acl"]
    assert setuser.startswith("ACL SETUSER ")
    assert aclfile.startswith("user ")
    with pytest.raises(REFUSED):
        await pc.client().ping()
    # The operator applies the printed rules (on every node of a cluster).
    args = aclfile.split(" ")[1:]
    if isinstance(raw, RedisCluster):
        await raw.nodes_manager.initialize()  # every node, replicas too
        await raw.execute_command("ACL", "SETUSER", *args, target_nodes=raw.get_nodes())
    else:
        await raw.execute_command("ACL", "SETUSER", *args)
    client = pc.client()
    await client.xadd(pc.inbox, {"envelope": envelope("by-hand-1")})

    async def in_() -> bool:
        return len(await commands(db)) == 1

    await eventually(in_)
    with pytest.raises(NoPermissionError):
        await client.get("anything")
    # Revoked where the operator manages the users: the daemon stops reading
    # its inbox, and says which line removes the user.
    status, _h, revoked = await api.call("DELETE", "/agents/by-hand", local=True)
    assert status == 200
    assert revoked["aclsManaged"] is False
    assert revoked["acl"] == [f"ACL DELUSER '{pc.made['agent']['redisUser']}'"]
    await client.xadd(pc.inbox, {"envelope": envelope("after-revoke")})
    await asyncio.sleep(1.0)
    assert [r["request_id"] for r in await commands(db)] == ["by-hand-1"]


async def test_agent_names_ids_and_roles_are_checked(api: Api, agents: Any) -> None:
    _u, user = await api.user("not-an-admin", "agent")
    assert (await api.call("POST", "/agents", token=user, json={"name": "x"}))[0] == 403
    assert (await api.call("GET", "/agents", token=user))[0] == 403
    await api.user("a-person")
    status, _h, problem = await api.call("POST", "/agents", local=True, json={"name": "a-person"})
    assert status == 409
    assert "not an agent" in problem["detail"]
    await agents("twice")
    status, _h, problem = await api.call("POST", "/agents", local=True, json={"name": "twice"})
    assert status == 409
    for bad in ("", "has space", "x" * 65, "a:b", "*"):
        assert (await api.call("POST", "/agents", local=True, json={"name": bad}))[0] == 400
    assert (await api.call("DELETE", "/agents/nobody", local=True))[0] == 404


async def test_an_agent_of_one_instance_cannot_reach_another_on_the_same_redis(
    api: Api,
    agents: Any,
    make_config: Callable[..., LoadedConfig],
    db_factory: Any,
    redis_url: str,
    tmp_path: Path,
) -> None:
    mine = await agents("a-agent")
    prefix = api.r.daemon.settings.redis.prefix
    other_prefix = f"jt:{uuid.uuid4().hex[:10]}:"
    other_dsn = await db_factory.create()
    loaded = make_config(
        redis={"prefix": other_prefix},
        postgres={"dsn": other_dsn},
        daemon={"state_dir": str(tmp_path / "other")},
        http={"unix_socket": str(tmp_path / "other.sock")},
        bus=FAST,
    )
    try:
        async for other in start_daemon(loaded):
            await other.wait_ready()
            other_api = Api(other, str(tmp_path / "other.sock"))
            try:
                status, _h, made = await other_api.call(
                    "POST", "/agents", local=True, json={"name": "b-agent"}
                )
                assert status == 201, made
                theirs = Agent(made)
                client = theirs.client()
                for stream in (mine.inbox, api.r.daemon.settings.inbox):
                    with pytest.raises(NoPermissionError):
                        await client.xadd(stream, {"envelope": envelope("cross")})
                for channel in (
                    f"{prefix}events",
                    f"{prefix}internal:principals",
                    f"{prefix}internal:agents",
                    mine.inbox,
                ):
                    with pytest.raises(NoPermissionError):
                        await client.publish(channel, envelope("cross"))
                listener = await subscriber(client)
                await listener.subscribe(f"{prefix}approvals")
                with pytest.raises(NoPermissionError):
                    await confirmations(listener, 1)
                await listener.aclose()
                await theirs.close()
            finally:
                await other_api.unix.close()
    finally:
        await unlink_prefix(redis_url, other_prefix)
        await delete_acl_users(redis_url, other_prefix)
        await db_factory.drop(other_dsn)


async def test_an_agent_flooding_its_channel_costs_the_daemons_own_channels_nothing(
    api: Api, agents: Any
) -> None:
    """Big messages on what agents can publish on may cost clients a gap (a
    connection of their own), never the daemon's own channels: the caller
    cache's invalidations, the events its caches follow."""
    pc = await agents("flooder")
    client = pc.client()
    main = api.r.daemon.supervisor.get("pubsub")
    before = main.snapshot()["pubsub"]["reconnects"]
    big = b"A" * 3_000_000
    for _ in range(20):
        # (The embedded Valkey takes no value over embedded.valkey_max_value.)
        with contextlib.suppress(RedisConnectionError, ResponseError):
            await client.publish(pc.inbox, big)
    await asyncio.sleep(1.0)
    assert main.snapshot()["pubsub"]["reconnects"] == before
    assert api.r.daemon.runtime.principals.enabled
    assert api.r.daemon.supervisor.get("bus").snapshot()["crashes"] == 0


async def test_agents_added_before_a_restart_are_read_from_the_start(
    make_config: Callable[..., LoadedConfig], db: asyncpg.Connection
) -> None:
    loaded = make_config(bus=FAST)
    sock = str(loaded.settings.http.unix_socket)
    async for running in start_daemon(loaded):
        await running.wait_ready()
        first = Api(running, sock)
        status, _h, made = await first.call("POST", "/agents", local=True, json={"name": "early"})
        assert status == 201, made
        await first.unix.close()
    agent = Agent(made)
    async for _running in start_daemon(loaded):
        client = agent.client()
        await client.xadd(agent.inbox, {"envelope": envelope("after-restart")})

        async def read() -> bool:
            return len(await commands(db)) == 1

        await eventually(read, timeout=10)
        await agent.close()


async def test_an_agent_disabled_demoted_or_deleted_loses_its_redis_user(
    api: Api, agents: Any
) -> None:
    for change in ({"disabled": True}, {"role": "user"}, None):
        pc = await agents(f"gone-{len(str(change))}")
        assert await pc.client().ping()
        uid = pc.made["agent"]["userId"]
        if change is None:
            assert (await api.call("DELETE", f"/users/{uid}", local=True))[0] == 204
        else:
            assert (await api.call("PUT", f"/users/{uid}", local=True, json=change))[0] == 200
        with pytest.raises(REFUSED):
            await ping(pc.url)
        if change is not None:  # enabled, or an agent again: the old password stays dead
            undo = {"disabled": False} if "disabled" in change else {"role": "agent"}
            assert (await api.call("PUT", f"/users/{uid}", local=True, json=undo))[0] == 200
            with pytest.raises(REFUSED):
                await ping(pc.url)
