"""Typed settings: one msgspec Struct per TOML section (DESIGN §9, §13).

Every field has a default, so an empty file is a valid (embedded) configuration.
Unknown keys are rejected: a typo must never be silently ignored.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from typing import Annotated, Literal

import msgspec

from config.webhooks import WebhookSettings

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["json", "console", "auto"]


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class DaemonSettings(_Section, frozen=True):
    # This daemon's name among several on the same servers (stats, metrics, its
    # bus consumer); empty: the host name.
    name: Annotated[str, msgspec.Meta(max_length=100, pattern=r"^[A-Za-z0-9_.-]*$")] = ""
    state_dir: str = "/var/lib/jarvisd"
    log_level: LogLevel = "info"
    log_format: LogFormat = "auto"
    # Kept below systemd's TimeoutStopSec so a drain never ends in SIGKILL.
    shutdown_timeout: PositiveFloat = 20.0
    # On SIGTERM, readiness answers 503 this long before actors stop, so
    # monitors and load balancers see the drain before the work stops.
    drain_grace: NonNegativeFloat = 0.0
    # How often actors refresh the health they report; /health/ready reads the cache.
    health_interval: PositiveFloat = 2.0


class SupervisorSettings(_Section, frozen=True):
    max_restarts: NonNegativeInt = 5
    restart_window: PositiveFloat = 60.0
    backoff_initial: NonNegativeFloat = 0.5
    backoff_max: NonNegativeFloat = 15.0


class HttpSettings(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 8017
    unix_socket: str | None = None
    max_body_bytes: PositiveInt = 1_048_576
    # Bounded per-request wait for an actor's answer before the API says 503.
    request_timeout: PositiveFloat = 10.0
    # Health, stats and metrics without credentials (/health/live always is).
    public_health: bool = True
    # GET /commands and /approvals answers are kept this long for a caller
    # repeating a query, dropped by any change (0: not kept).
    list_cache_ttl: NonNegativeFloat = 1.0
    # A connection that has not sent a complete request head within this many
    # seconds (an idle keep-alive connection, or a slow or stalled client) is closed.
    idle_timeout: PositiveFloat = 30.0
    # Requests being answered at once (WebSockets and long-polls aside, which
    # have caps of their own); past it a request is answered 503 with
    # Retry-After at once instead of queueing: overload costs bounded memory.
    max_in_flight: PositiveInt = 1024
    # WebSocket clients at once; past it an upgrade is answered 503.
    max_websockets: PositiveInt = 5000
    # WebSockets one user may hold at once (the local admin counts as one); past it, 429.
    max_websockets_per_principal: PositiveInt = 100
    # WebSockets one client address may hold while they have yet to send
    # their first-frame credentials; past it, 429.
    max_unauthenticated_per_address: PositiveInt = 10
    # Proxies in front of jarvisd (their addresses) whose X-Forwarded-For is
    # believed: the client's address is the nearest one that is not a proxy.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)


class PostgresSettings(_Section, frozen=True):
    dsn: str | None = None
    dsn_file: str | None = None
    pool_min: NonNegativeInt = 1
    pool_max: PositiveInt = 10
    migrate_on_start: bool = True
    connect_timeout: PositiveFloat = 5.0
    command_timeout: PositiveFloat = 30.0


class RedisSettings(_Section, frozen=True):
    url: str | None = None
    url_file: str | None = None
    prefix: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "jarvis:"
    connect_timeout: PositiveFloat = 5.0
    # A Redis Cluster (or Valkey cluster): url names one seed node. A
    # redis+cluster:// URL may name several (host:port,host:port) and implies it.
    cluster: bool = False
    # On a cluster, a session write (create, update, rotate, delete, revoke)
    # is answered once a replica has it (WAIT), or after this many seconds:
    # what was acknowledged survives a failover. 0: do not wait.
    replica_wait: NonNegativeFloat = 0.5


class EmbeddedSettings(_Section, frozen=True):
    enabled: bool = False
    # PostgreSQL refuses to run as root; when jarvisd runs as root both
    # embedded servers run as this system account of their own instead
    # (created when missing; never a shared account such as nobody).
    postgres_user: str = "jarvisd-embedded"
    # Override binary discovery (a directory holding initdb/postgres/pg_ctl,
    # and the valkey-server or redis-server executable).
    postgres_bin_dir: str | None = None
    valkey_bin: str | None = None
    # The embedded Valkey's memory, and the largest value one command may
    # carry (agents write to it: neither a flood nor one huge entry takes
    # the host's memory; past them, writes are refused). cache.max_value_bytes
    # must stay below valkey_max_value.
    valkey_max_memory: Annotated[str, msgspec.Meta(pattern=r"^[0-9]+(kb|mb|gb)?$")] = "1gb"
    valkey_max_value: Annotated[str, msgspec.Meta(pattern=r"^[0-9]+(kb|mb|gb)?$")] = "1mb"
    start_timeout: PositiveFloat = 60.0


class CacheSettings(_Section, frozen=True):
    default_ttl: PositiveInt = 300
    # The longest TTL a client may ask for (seconds); longer ones are capped to it.
    max_ttl: PositiveInt = 7 * 86400
    # Largest value one key may hold (encoded); bigger ones are refused (HTTP 413).
    max_value_bytes: PositiveInt = 524_288
    # Statistics are kept for this many namespaces; the rest are counted together as "_other".
    max_namespaces: PositiveInt = 64


class SessionSettings(_Section, frozen=True):
    idle_ttl: PositiveInt = 1800
    absolute_ttl: PositiveInt = 86400
    # The longest idle or absolute lifetime a client may ask for when it creates
    # an application session (POST /sessions); longer ones are capped to it.
    max_ttl: PositiveInt = 7 * 86400
    # Sessions one user may hold in each store (login, application); past it,
    # the ones nearest their deadline are removed.
    max_per_user: PositiveInt = 100


class AuthSettings(_Section, frozen=True):
    # Failed logins allowed per user name and per client address within
    # login_window seconds; past that, POST /auth/login answers 429.
    login_failures_per_user: PositiveInt = 10
    login_failures_per_address: PositiveInt = 50
    login_window: PositiveInt = 300
    # The longest lifetime of an API token (seconds); 0: tokens may live until
    # revoked. When set, tokens created without expiresIn get this lifetime.
    token_max_ttl: NonNegativeInt = 0
    # Live (not revoked, not expired) tokens one user may hold.
    max_tokens_per_user: PositiveInt = 100
    # Who a token or login session is, kept in memory this many seconds (and
    # for at most cache_size of them). Revocations drop entries at once on every
    # daemon; the TTL bounds how long a cached caller is trusted while
    # PostgreSQL is down.
    cache_ttl: PositiveFloat = 30.0
    cache_size: PositiveInt = 10_000


class PubSubSettings(_Section, frozen=True):
    # Longest wait for a message before the reader looks at its other duties.
    poll_interval: PositiveFloat = 0.05
    # The listener publishes a heartbeat this often (on a cluster, through
    # another node) and expects it back on its own connection within
    # ping_timeout: one that does not come back means the connection hears
    # nothing (half-open, or its node cut from the cluster bus): it is replaced.
    ping_interval: PositiveFloat = 5.0
    ping_timeout: PositiveFloat = 3.0
    reconnect_max: PositiveFloat = 5.0
    # Bytes waiting to be sent to one WebSocket client; past it the client is
    # dropped (1013) rather than waited for.
    client_buffer_bytes: PositiveInt = 1_048_576
    # Largest message POST /publish accepts (encoded).
    max_message_bytes: PositiveInt = 65_536
    # WebSocket clients are pinged this often; one that does not answer is closed.
    ws_heartbeat: PositiveFloat = 30.0
    # Channels outside the daemon's own (redis.prefix) that POST /publish, /ws
    # and agents on Redis may use (names, or globs with a literal start such
    # as "user_*", never one that could reach redis.prefix or bus.stream); the
    # rest of the Redis server's channels are not reachable through jarvisd.
    channels: list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:@/*?-]{1,200}$")]] = (
        msgspec.field(default_factory=lambda: ["user_activity"])
    )
    # Over all of one user's WebSockets: channels and patterns subscribed at once.
    max_subscriptions_per_principal: PositiveInt = 1000
    max_patterns_per_principal: PositiveInt = 20
    # Distinct patterns the daemon holds on Redis at once: each one costs every
    # PUBLISH on the Redis server, for every database and tenant on it.
    max_patterns: PositiveInt = 1000


class BusSettings(_Section, frozen=True):
    # The shared inbox: a stream (XADD) and a channel (PUBLISH) of this name,
    # read only with shared_inbox = true; each agent's own inbox is named
    # after it (jarvisd agent add). Unset: redis.prefix + "inbox" ("jarvis:inbox").
    stream: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^{}]*$")] | None
    ) = None
    # Read the shared inbox too: anyone who can write it on this Redis sends
    # envelopes as "inbox" (no agent identity). For trusted writers only.
    shared_inbox: bool = False
    # Create and remove the agents' Redis ACL users (needs a Redis user that
    # may run ACL SETUSER); false, or refused by Redis: the operator applies
    # the ACL lines jarvisd agent add prints.
    manage_acls: bool = True
    # How often the list of agents is read again in any case; a change made
    # through any daemon reaches every daemon at once (an internal channel).
    agents_interval: PositiveFloat = 30.0
    group: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = "jarvisd"
    # An entry delivered this many times without being processed is dead-lettered.
    max_deliveries: PositiveInt = 5
    # Entries read (and committed) per round.
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000
    # Longest wait for new entries in one read (milliseconds).
    block_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 1000
    # An entry pending this long (a daemon died holding it, or it failed) is
    # claimed by the next daemon that looks, this one included.
    claim_idle: PositiveFloat = 30.0
    claim_interval: PositiveFloat = 5.0
    # Bigger envelopes are dead-lettered unread.
    max_envelope_bytes: PositiveInt = 65_536
    # The stream is trimmed to what is not yet processed; past max_length
    # entries (a backlog nobody consumes) the oldest go anyway.
    max_length: PositiveInt = 1_000_000
    dead_max_length: PositiveInt = 10_000
    trim_interval: PositiveFloat = 10.0


Score = Annotated[int, msgspec.Meta(ge=0, le=100)]


class RiskRule(_Section, frozen=True):
    """Commands whose action matches ``action`` (a glob, case-insensitive) score ``score``."""

    action: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    score: Score


# What jarvisd scores out of the box: the first rule that matches wins; an
# action no rule matches scores default_score. An agent's suggested score may
# raise a command's score, never lower it.
DEFAULT_RULES: tuple[RiskRule, ...] = (
    RiskRule(action="shell*", score=95),
    RiskRule(action="exec*", score=95),
    RiskRule(action="run_command*", score=95),
    RiskRule(action="sudo*", score=95),
    RiskRule(action="format*", score=95),
    RiskRule(action="wipe*", score=95),
    RiskRule(action="rm", score=90),
    RiskRule(action="rm[_.:-]*", score=90),
    RiskRule(action="transfer*", score=85),
    RiskRule(action="pay*", score=85),
    RiskRule(action="purchase*", score=85),
    RiskRule(action="delete*", score=80),
    RiskRule(action="remove*", score=80),
    RiskRule(action="erase*", score=80),
    RiskRule(action="uninstall*", score=75),
    RiskRule(action="install*", score=75),
    RiskRule(action="shutdown*", score=75),
    RiskRule(action="reboot*", score=75),
    RiskRule(action="send_*", score=60),
    RiskRule(action="post_*", score=60),
    RiskRule(action="write_*", score=50),
)


class Quorum(_Section, frozen=True):
    """How many distinct people approve a request of a risk category, and how
    many of them must be admins."""

    approvals: Annotated[int, msgspec.Meta(ge=1, le=10)] = 1
    # Not given: the default's for the category (CRITICAL: 1), else 0.
    admins: Annotated[int, msgspec.Meta(ge=0, le=10)] | None = None

    def __post_init__(self) -> None:
        if self.admins is not None and self.admins > self.approvals:
            raise ValueError(
                f"a quorum of {self.approvals} cannot hold {self.admins} admins "
                "(admins <= approvals)"
            )


Category = Literal["LOW", "MEDIUM", "HIGH", "CRITICAL"]
# Out of the box a CRITICAL request needs one approval, an admin's.
DEFAULT_QUORUM: dict[Category, Quorum] = {"CRITICAL": Quorum(approvals=1, admins=1)}
SINGLE = Quorum(approvals=1, admins=0)


class ApprovalSettings(_Section, frozen=True):
    threshold: Score = 70
    expiry: PositiveInt = 900
    # The longest expiry a requester may ask for (expiresIn); longer ones are capped to it.
    max_expiry: PositiveInt = 86400
    default_score: Score = 30
    rules: list[RiskRule] = msgspec.field(default_factory=lambda: list(DEFAULT_RULES))
    # approval.warning goes out this long before a request expires (or in the
    # last quarter of a shorter lifetime).
    warn_before: PositiveFloat = 60.0
    # How often the sweeper (one daemon at a time) warns and expires.
    sweep_interval: PositiveFloat = 5.0
    # GET /approvals/{id}?wait=N callers waiting at once, per daemon and per
    # user; past either, a long-poll is answered at once with the current state.
    max_waiters: PositiveInt = 10_000
    max_waiters_per_principal: PositiveInt = 100
    # Distinct approvers a request needs, by risk category, over the default
    # (CRITICAL: one approval, an admin's); a category listed in neither
    # needs one approval, anybody's who may decide. One rejection ends a
    # request, whatever its quorum.
    quorum: dict[Category, Quorum] = msgspec.field(default_factory=dict)
    # A request still pending this many seconds after it was made is
    # escalated (once): announced as approval.escalated, for the wider group
    # a webhook reaches. 0: never.
    escalate_after: NonNegativeFloat = 300.0

    def score(self, action: str) -> int:
        """The policy's score for ``action``: the first matching rule's, else
        the default. A name made of parts (``agent:shell_exec``, ``rm-rf``,
        ``files.delete``) is scored as its whole and as each part onward, and
        the highest score counts: no prefix hides a risky verb."""
        return self.explain(action)[0]

    def explain(self, action: str, asked: int = 0) -> tuple[int, str]:
        """The score of ``action`` and what made it: the rule, the default, or
        the requester's own higher score (``asked``)."""
        rules = tuple((r.action, r.score) for r in self.rules)
        score, glob = _score(rules, self.default_score, action)
        if asked > score:
            return asked, "asked by the sender"
        return score, ("default score" if glob is None else f'rule "{glob}"')

    def quorum_of(self, category: Category) -> Quorum:
        """The category's quorum, its admins always given: a quorum that
        leaves them out keeps the default's (``CRITICAL = {approvals = 2}``
        still needs an admin); ``admins = 0`` says none."""
        default = DEFAULT_QUORUM.get(category, SINGLE)
        given = self.quorum.get(category)
        if given is None:
            return default
        if given.admins is not None:
            return given
        return Quorum(approvals=given.approvals, admins=min(default.admins or 0, given.approvals))


@functools.lru_cache(maxsize=64)
def _policy(rules: tuple[tuple[str, int], ...]) -> re.Pattern[str]:
    """All rules as one pattern: the first alternative that matches is the
    first rule that matches."""
    parts = [
        f"(?P<r{i}>{fnmatch.translate(glob.casefold())})" for i, (glob, _s) in enumerate(rules)
    ]
    return re.compile("|".join(parts) or "(?!)")


_PARTS = re.compile(r"[:._-]")


@functools.lru_cache(maxsize=4096)
def _score(rules: tuple[tuple[str, int], ...], default: int, action: str) -> tuple[int, str | None]:
    """(score, the glob of the rule that gave it), or (default, None)."""
    name = action.casefold()
    tails = [name, *(name[m.end() :] for m in _PARTS.finditer(name))]
    found = [r for r in (_first(rules, tail) for tail in tails if tail) if r is not None]
    if not found:
        return default, None
    glob, score = max(found, key=lambda r: r[1])
    return score, glob


def _first(rules: tuple[tuple[str, int], ...], name: str) -> tuple[str, int] | None:
    found = _policy(rules).match(name)
    if found is None:
        return None
    # fnmatch's own groups may nest inside: the rule is the r<i> group that matched.
    return next(rules[i] for i in range(len(rules)) if found.group(f"r{i}") is not None)


class EventSettings(_Section, frozen=True):
    # Every event is written to PostgreSQL (the outbox) in the transaction of
    # the change it announces, then relayed to Redis in id order by one
    # daemon at a time. false: this daemon never relays (another one does).
    relay: bool = True
    # Events are kept this many seconds (for clients resuming with `since`),
    # then pruned in batches; at least a minute.
    retention: Annotated[int, msgspec.Meta(ge=60)] = 7 * 86400
    # Events the relay reads and publishes in one round trip. Redis runs a
    # batch as one script: a big one holds every other client (the agents'
    # inboxes) waiting meanwhile.
    relay_batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    # Seconds between looks at the outbox when no notification wakes the
    # relay (a notification is lost only with its connection).
    poll_interval: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0


class Settings(_Section, frozen=True):
    daemon: DaemonSettings = msgspec.field(default_factory=DaemonSettings)
    supervisor: SupervisorSettings = msgspec.field(default_factory=SupervisorSettings)
    http: HttpSettings = msgspec.field(default_factory=HttpSettings)
    postgres: PostgresSettings = msgspec.field(default_factory=PostgresSettings)
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    embedded: EmbeddedSettings = msgspec.field(default_factory=EmbeddedSettings)
    cache: CacheSettings = msgspec.field(default_factory=CacheSettings)
    sessions: SessionSettings = msgspec.field(default_factory=SessionSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    pubsub: PubSubSettings = msgspec.field(default_factory=PubSubSettings)
    bus: BusSettings = msgspec.field(default_factory=BusSettings)
    approvals: ApprovalSettings = msgspec.field(default_factory=ApprovalSettings)
    events: EventSettings = msgspec.field(default_factory=EventSettings)
    # [[webhooks]]: an array of tables, one per endpoint (config/webhooks.py).
    webhooks: tuple[WebhookSettings, ...] = ()

    @property
    def embedded_postgres(self) -> bool:
        """True when jarvisd must run PostgreSQL itself (embedded, no DSN given)."""
        return self.embedded.enabled and self.postgres.dsn is None

    @property
    def inbox(self) -> str:
        """The agents' inbox stream and channel (bus.stream, else {prefix}inbox)."""
        return self.bus.stream or f"{self.redis.prefix}inbox"

    @property
    def embedded_redis(self) -> bool:
        """True when jarvisd must run Valkey itself (embedded, no URL given)."""
        return self.embedded.enabled and self.redis.url is None


# Keys whose values are secrets: redacted wherever the config is shown.
SECRET_KEYS: frozenset[tuple[str, str]] = frozenset({("postgres", "dsn"), ("redis", "url")})
# Keys holding filesystem paths: relative values resolve against the config file's folder.
PATH_KEYS: frozenset[tuple[str, str]] = frozenset(
    {
        ("daemon", "state_dir"),
        ("http", "unix_socket"),
        ("postgres", "dsn_file"),
        ("redis", "url_file"),
        ("embedded", "postgres_bin_dir"),
        ("embedded", "valkey_bin"),
    }
)
