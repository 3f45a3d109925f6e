"""Agents on Redis (DESIGN §5, "Trust"): names and access rules.

Each agent is a Redis ACL user of its own, ``{prefix}agent:{name}``, which
jarvisd creates (``ACL SETUSER``) and removes. It may:

- append (``XADD``) to its own inbox stream, and ``PUBLISH`` on the channel of
  the same name (the fire-and-forget path): the daemon knows who sent an
  envelope from where it arrived, never from what it says;
- ``SUBSCRIBE`` to the daemon's event channels (``{prefix}events``,
  ``{prefix}commands``, ``{prefix}approvals``) and to its own replies channel,
  where the daemon tells it why an envelope was refused;
- publish and subscribe on the pass-through channels ``pubsub.channels``
  allows (``user_activity``).

Nothing else: no key but its inbox, no other command. Only the daemon's own
Redis user touches sessions, the cache, the consumer group, dead letters and
internal channels.

Every inbox carries the same hash tag (the shared inbox's name), so on a
Redis Cluster all of them sit in one slot and one ``XREADGROUP`` reads them all.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = [
    "acl_lines",
    "acl_rules",
    "acl_user",
    "agent_inbox",
    "agent_replies",
    "agent_url",
    "glob_escape",
    "without_credentials",
]

# What any Redis client needs to connect, name itself and find a cluster's slots.
# (No SELECT unless the daemon's database is not 0: in another database an
# agent's inbox key would be nobody's, never read nor trimmed.)
_CONNECT = (
    "+ping",
    "+echo",
    "+hello",
    "+auth",
    "+quit",
    "+command",
    "+client|setname",
    "+client|id",
    "+readonly",
    "+readwrite",
    "+asking",
    "+cluster|slots",
    "+cluster|shards",
    "+cluster|nodes",
    "+cluster|myid",
)
_GLOB = re.compile(r"([*?\[\]\\])")


def glob_escape(name: str) -> str:
    """``name`` as a Redis glob that matches only itself."""
    return _GLOB.sub(r"\\\1", name)


def acl_user(prefix: str, name: str) -> str:
    return f"{prefix}agent:{name}"


def agent_inbox(inbox: str, name: str) -> str:
    """The agent's inbox: a stream for XADD and a channel for PUBLISH. The
    braces hold the shared inbox's name: every inbox hashes to its slot."""
    return f"{inbox}:{name}:{{{inbox}}}"


def agent_replies(inbox: str, name: str) -> str:
    """Where the daemon tells the agent what became of an envelope it refused."""
    return f"{inbox}:{name}:replies"


def acl_rules(
    *,
    prefix: str,
    inbox: str,
    name: str,
    secret_hash: str,
    channels: list[str],
    setinfo: bool = True,
    select: bool = False,
) -> list[str]:
    """The arguments of ``ACL SETUSER <user> …`` for an agent (Redis 7 selectors:
    the root rule subscribes; one selector appends to the inbox, one publishes)."""
    own = glob_escape(agent_inbox(inbox, name))
    events = [glob_escape(f"{prefix}{kind}") for kind in ("events", "commands", "approvals")]
    replies = glob_escape(agent_replies(inbox, name))
    return [
        "reset",
        "on",
        f"#{secret_hash}",
        "resetchannels",
        "resetkeys",
        "-@all",
        *_CONNECT,
        *(("+client|setinfo",) if setinfo else ()),
        *(("+select",) if select else ()),
        "+subscribe",
        "+unsubscribe",
        *(f"&{c}" for c in (*events, replies, *channels)),
        f"(~{own} +xadd)",
        f"(+publish &{own}{''.join(f' &{c}' for c in channels)})",
    ]


def acl_lines(user: str, rules: list[str]) -> list[str]:
    """The same rules as an operator types them: for redis-cli, and for an ACL file."""
    quoted = " ".join(f"'{r}'" if any(ch in r for ch in " ()&|#") else r for r in rules)
    aclfile = " ".join(r for r in rules if r not in ("reset",))
    return [f"ACL SETUSER '{user}' {quoted}", f"user {user} {aclfile}"]


def without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))


def agent_url(url: str, user: str, password: str) -> str:
    """``url`` (the daemon's Redis) with the agent's credentials instead."""
    parts = urlsplit(without_credentials(url))
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.netloc}"
    return urlunsplit(parts._replace(netloc=netloc))
