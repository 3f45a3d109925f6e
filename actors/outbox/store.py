"""Writing events into the outbox, in the transaction of the change they
announce, and giving them back as the bytes that are sent.

Ids are taken under a transaction-level advisory lock, held to the commit:
a transaction that took ids commits before the next one takes any, so the
ids a reader sees always form a prefix (no event with a lower id appears
later). The lock is taken last, just before the insert, and held only for
the insert and the commit."""

from __future__ import annotations

import hashlib

import asyncpg
import msgspec

from actors.events import Event, Published

__all__ = ["NOTIFY_CHANNEL", "OUTBOX_LOCK", "body_of", "record", "wire"]

OUTBOX_LOCK = int.from_bytes(hashlib.sha256(b"jarvisd.event-outbox").digest()[:8], "big") >> 1
# Told at each commit that wrote events (the payload: the highest id).
NOTIFY_CHANNEL = "jarvisd_events"

_encoder = msgspec.json.Encoder()
_HEAD = b'{"v":1,"id":""'


def body_of(evt: Event) -> str:
    """The event's JSON after its id: what the outbox keeps."""
    encoded = _encoder.encode(msgspec.structs.replace(evt, id=""))
    assert encoded.startswith(_HEAD), encoded[:40]
    return encoded[len(_HEAD) :].decode()


def wire(event_id: int, body: str) -> bytes:
    """The event as sent: its outbox id written in as its ``id``."""
    return b'{"v":1,"id":"%d"' % event_id + body.encode()


async def record(conn: asyncpg.Connection, published: list[Published]) -> int | None:
    """Write ``published`` into the outbox inside the caller's transaction;
    the highest id taken, or None when there was nothing."""
    if not published:
        return None
    await conn.execute("SELECT pg_advisory_xact_lock($1)", OUTBOX_LOCK)
    row = await conn.fetchrow(
        "WITH written AS (INSERT INTO events (kind, type, user_id, body) "
        "SELECT k, t, u, b FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) "
        "WITH ORDINALITY AS x(k, t, u, b, n) ORDER BY n RETURNING id) "
        "SELECT m, pg_notify($5, m::text) FROM (SELECT max(id) AS m FROM written) top",
        [kind for kind, _evt in published],
        [evt.type for _kind, evt in published],
        [evt.user_id for _kind, evt in published],
        [body_of(evt) for _kind, evt in published],
        NOTIFY_CHANNEL,
    )
    return int(row["m"])
