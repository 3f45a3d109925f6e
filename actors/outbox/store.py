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

__all__ = ["NOTIFY_CHANNEL", "OUTBOX_LOCK", "Written", "body_of", "record", "wire"]

OUTBOX_LOCK = int.from_bytes(hashlib.sha256(b"jarvisd.event-outbox").digest()[:8], "big") >> 1
# Told at each commit that wrote events (the payload: the highest id).
NOTIFY_CHANNEL = "jarvisd_events"

# An event as written: its id, its kind (the channel beside {prefix}events)
# and the bytes that are sent.
Written = tuple[int, str, bytes]

_encoder = msgspec.json.Encoder()
_HEAD = b'{"v":1,"id":""'


def body_of(evt: Event) -> str:
    """The event's JSON after its id: what the outbox keeps."""
    encoded = _encoder.encode(evt if evt.id == "" else msgspec.structs.replace(evt, id=""))
    if not encoded.startswith(_HEAD):
        raise AssertionError(encoded[:40])
    return encoded[len(_HEAD) :].decode()


def wire(event_id: int, body: str) -> bytes:
    """The event as sent: its outbox id written in as its ``id``."""
    return b'{"v":1,"id":"%d"' % event_id + body.encode()


async def record(conn: asyncpg.Connection, published: list[Published]) -> list[Written]:
    """Write ``published`` into the outbox inside the caller's transaction;
    each event as it will be sent, with its id, in id order."""
    if not published:
        return []
    bodies = [body_of(evt) for _kind, evt in published]
    # One round trip: every row the insert takes (and gives an id) comes out
    # of a join with the lock's row, so whatever the plan, the lock is held
    # before the first id is taken.
    row = await conn.fetchrow(
        "WITH locked AS MATERIALIZED (SELECT pg_advisory_xact_lock($6) AS held), "
        "written AS (INSERT INTO events (kind, type, user_id, body) "
        "SELECT k, t, u, b FROM locked, "
        "unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) "
        "WITH ORDINALITY AS x(k, t, u, b, n) ORDER BY n RETURNING id) "
        "SELECT ids, pg_notify($5, ids[array_upper(ids, 1)]::text) "
        "FROM (SELECT array_agg(id ORDER BY id) AS ids FROM written) taken",
        [kind for kind, _evt in published],
        [evt.type for _kind, evt in published],
        [evt.user_id for _kind, evt in published],
        bodies,
        NOTIFY_CHANNEL,
        OUTBOX_LOCK,
    )
    return [
        (event_id, kind, wire(event_id, body))
        for event_id, (kind, _evt), body in zip(row["ids"], published, bodies, strict=True)
    ]
