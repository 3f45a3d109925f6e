"""Session writes on a Redis Cluster, answered only once a replica has them.

A session is a credential: one acknowledged and then lost in a failover
(replication is asynchronous) would log its user out, or worse, bring back
one that was revoked. So each write is its script and a WAIT, in one pipeline
on one connection to the primary of the keys' slot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AskError, MovedError

from actors.redis_link import REDIS_FAILURES, RedisClient, connect_redis, node_url
from config import RedisSettings

__all__ = ["ReplicatedWrites"]


class ReplicatedWrites:
    def __init__(
        self,
        url: str,
        redis_settings: RedisSettings,
        *,
        client: Callable[[], RedisClient],
        name: str,
        wait_ms: Callable[[], int],
        unavailable: type[Exception],
    ) -> None:
        self.url = url
        self.redis_settings = redis_settings
        self._client = client
        self.name = name
        self._wait_ms = wait_ms
        self.unavailable = unavailable
        self._nodes: dict[tuple[str, int], aioredis.Redis] = {}  # one client per primary
        self.unreplicated = 0  # writes no replica had within redis.replica_wait

    async def call(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """The script ``source``, then WAIT, on the primary of the keys' slot,
        so the answer comes once a replica has the write (or after
        ``redis.replica_wait``: such writes are counted). A MOVED or ASK
        answer is followed to the node it names; a node that cannot be
        reached makes the write fail (503), and the slot map is read again
        for the next one."""
        cluster = self._client()
        assert isinstance(cluster, RedisCluster)
        await cluster.initialize()  # (at once when it knows the slots already)
        node = cluster.get_node_from_key(keys[0])
        if node is None:
            raise self.unavailable("no primary serves the keys' slot now")
        where, asking = (node.host, int(node.port)), False
        for _hop in range(3):
            pipe = self._node(*where).pipeline(transaction=False)
            if asking:
                pipe.execute_command("ASKING")
            pipe.execute_command("EVAL", source, len(keys), *keys, *args)
            pipe.execute_command("WAIT", 1, self._wait_ms())
            try:
                *_asked, result, acked = await pipe.execute(raise_on_error=False)
            except REDIS_FAILURES:
                with contextlib.suppress(*REDIS_FAILURES):
                    await cluster.nodes_manager.initialize()
                raise
            if isinstance(result, AskError):  # MovedError too: the slot is elsewhere
                where, asking = result.node_addr, not isinstance(result, MovedError)
                continue
            if isinstance(result, Exception):
                raise result
            if isinstance(acked, Exception) or int(acked) < 1:
                self.unreplicated += 1
            return result
        raise self.unavailable("the keys' slot kept moving; try again")

    def _node(self, host: str, port: int) -> aioredis.Redis:
        if (host, port) not in self._nodes:
            # A node URL without +cluster: a plain client, one connection a pipeline.
            made = connect_redis(
                node_url(self.url, host, port),
                name=self.name,
                timeout=self.redis_settings.connect_timeout,
            )
            assert isinstance(made, aioredis.Redis)
            self._nodes[(host, port)] = made
        return self._nodes[(host, port)]

    async def close(self) -> None:
        nodes, self._nodes = self._nodes, {}
        for client in nodes.values():
            with contextlib.suppress(*REDIS_FAILURES):
                await client.aclose()
