"""How the daemon's actors are made from the settings, and wired together
(DESIGN §3): which actor talks to which, through which typed reference."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

from actors.approvals import Approvals
from actors.bus import Bus
from actors.cache import Cache, CacheRef
from actors.embedded import ChildServer, EmbeddedPostgres, EmbeddedValkey, RunAs
from actors.outbox import Relay, Webhooks
from actors.persistence import Persistence, PersistenceRef
from actors.pubsub import CLIENTS_PUBSUB, PubSub, PubSubRef
from actors.redis_link import RedisLink
from actors.sessions import Logins, Sessions
from config import Settings
from jarvisd.runtime import Check, DaemonActors

__all__ = ["build_actors", "consumer_name"]


def build_actors(settings: Settings) -> tuple[DaemonActors, list[Check]]:
    """The daemon's actors, and the health checks they answer."""
    interval = settings.daemon.health_interval
    state_dir = Path(settings.daemon.state_dir)
    embedded: list[ChildServer] = []
    checks: list[Check] = []
    run_as = RunAs.resolve(settings.embedded.postgres_user) if settings.embedded.enabled else None

    pg_dsn = settings.postgres.dsn
    if settings.embedded_postgres:
        assert run_as is not None
        pg = EmbeddedPostgres(
            state_dir,
            run_as=run_as,
            bin_dir=settings.embedded.postgres_bin_dir,
            start_timeout=settings.embedded.start_timeout,
        )
        pg.health_interval = interval
        embedded.append(pg)
        checks.append(Check("embedded-postgres", pg, "system"))
        pg_dsn = pg.dsn
    redis_url = settings.redis.url
    if settings.embedded_redis:
        assert run_as is not None
        vk = EmbeddedValkey(
            state_dir,
            run_as=run_as,
            binary=settings.embedded.valkey_bin,
            start_timeout=settings.embedded.start_timeout,
            max_memory=settings.embedded.valkey_max_memory,
            max_value=settings.embedded.valkey_max_value,
        )
        vk.health_interval = interval
        embedded.append(vk)
        checks.append(Check("embedded-valkey", vk, "system"))
        redis_url = vk.url
    # Both are guaranteed by the loader's cross checks.
    assert pg_dsn is not None
    assert redis_url is not None

    persistence = Persistence(
        settings.postgres,
        pg_dsn,
        health_interval=interval,
        approvals=settings.approvals,
        # The first start makes the first admin; ready only once its token is written.
        admin_token_file=state_dir / "admin-token",
    )
    pg_ref = PersistenceRef(persistence)
    redis = RedisLink(settings.redis, redis_url, health_interval=interval)
    cache = Cache(settings.redis, settings.cache, redis_url, health_interval=interval)
    sessions = Sessions(settings.redis, settings.sessions, redis_url, health_interval=interval)
    logins = Logins(
        settings.redis,
        settings.sessions,
        settings.auth,
        redis_url,
        health_interval=interval,
        key_source=pg_ref,  # login sessions are signed under a key kept in PostgreSQL
    )
    pubsub = PubSub(settings.redis, settings.pubsub, redis_url, health_interval=interval)
    # A connection of its own for what agents and clients can publish on (the
    # inboxes' channels, pubsub.channels) and for WebSocket clients: a flood
    # of big messages there can cost those a gap, never the daemon's own
    # channels (caller invalidations, events for its caches, approval waiters).
    clients = PubSub(
        settings.redis,
        settings.pubsub,
        redis_url,
        name=CLIENTS_PUBSUB,
        health_interval=interval,
    )
    # Events commit with their changes (the outbox) and the relay sends them
    # to Redis, in order, one daemon at a time.
    relay = Relay(
        settings.events,
        settings.postgres,
        pg_dsn,
        pubsub=PubSubRef(pubsub),
        health_interval=interval,
    )
    persistence.relay = relay  # told after each commit that wrote events
    # [[webhooks]]: the outbox to HTTP endpoints, one daemon at a time.
    webhooks = Webhooks(
        settings.webhooks,
        settings.events,
        settings.postgres,
        pg_dsn,
        link_base=api_base(settings),
        health_interval=interval,
    )
    approvals = Approvals(
        settings.approvals,
        settings.postgres,
        pg_dsn,
        persistence=pg_ref,
        pubsub=PubSubRef(pubsub),
        channel=f"{settings.redis.prefix}approvals",
        health_interval=interval,
    )
    bus = Bus(
        settings.redis,
        settings.bus,
        redis_url,
        stream=settings.inbox,
        consumer=consumer_name(settings),
        persistence=pg_ref,
        cache=CacheRef(cache),
        pubsub=PubSubRef(clients),
        pubsub_settings=settings.pubsub,
        health_interval=interval,
    )
    built = DaemonActors(
        persistence=persistence,
        redis=redis,
        cache=cache,
        sessions=sessions,
        logins=logins,
        pubsub=pubsub,
        clients=clients,
        approvals=approvals,
        bus=bus,
        relay=relay,
        webhooks=webhooks,
        embedded=tuple(embedded),
    )
    checks = [
        Check("postgres", persistence, "datastore"),
        Check("redis", redis, "datastore"),
        Check("pubsub", pubsub, "component"),
        Check(CLIENTS_PUBSUB, clients, "component", critical=False),
        Check("bus", bus, "component", critical=False),
        Check("approvals", approvals, "component", critical=False),
        Check("relay", relay, "component", critical=False),
        Check("webhooks", webhooks, "component", critical=False),
        *checks,
    ]
    return built, checks


def api_base(settings: Settings) -> str:
    """Where people reach the API, for links in messages (webhooks' link_base
    says otherwise): its TCP address, a wildcard host named as this host."""
    host = settings.http.host
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - named, not bound
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.http.port}"


def consumer_name(settings: Settings) -> str:
    """This daemon's bus consumer: its name and its state directory, so that
    it is the same after a restart and differs between daemons on one host."""
    place = hashlib.sha256(os.path.abspath(settings.daemon.state_dir).encode()).hexdigest()
    return f"{settings.daemon.name or socket.gethostname()}-{place[:8]}"
