"""What becomes of each entry of a batch: before routing, whether it can be
routed at all; after, whether it is acknowledged, dead-lettered or left
pending for another delivery. Pure functions: the bus actor does the I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.bus.reader import Entry, key_of
from actors.bus.registry import Inbox
from actors.bus.routes import Item, Outcome
from actors.bus.store import Dead
from actors.envelope import Malformed, parse

__all__ = ["Batch", "settle", "sort"]


@dataclass
class Batch:
    """A batch as read: what is dead already, what goes to the router (with
    its delivery count), and every entry's raw envelope by key."""

    dead: list[Dead] = field(default_factory=list)
    good: list[tuple[Item, int]] = field(default_factory=list)
    raws: dict[str, bytes] = field(default_factory=dict)


def sort(
    entries: list[Entry],
    deliveries: dict[str, int] | None,
    inboxes: dict[str, Inbox],
    *,
    limit: int,
    max_bytes: int,
) -> Batch:
    """Parse each entry: an unknown inbox, a missing or malformed envelope, or
    one delivered more than ``limit`` times is dead at once."""
    batch = Batch()
    for stream, entry_id, fields in entries:
        key = key_of(stream, entry_id)
        count = 1 if deliveries is None else deliveries.get(key, 1)
        raw = fields.get(b"envelope")
        batch.raws[key] = raw or b""
        inbox = inboxes.get(stream)
        if inbox is None:
            batch.dead.append(Dead(stream, entry_id, raw or b"", "no such inbox", count))
        elif raw is None:
            batch.dead.append(Dead(stream, entry_id, b"", "malformed: no envelope field", count))
        elif count > limit:
            reason = f"delivered {count} times without being processed"
            batch.dead.append(Dead(stream, entry_id, raw, reason, count))
        else:
            parsed = parse(raw, max_bytes)
            if isinstance(parsed, Malformed):
                batch.dead.append(Dead(stream, entry_id, raw, parsed.reason, count, parsed.id))
            else:
                batch.good.append(((key, parsed, inbox.sender), count))
    return batch


def settle(
    batch: Batch, outcomes: dict[str, Outcome], *, limit: int
) -> tuple[list[tuple[str, str]], int]:
    """The entries to acknowledge (dead ones added to ``batch.dead``), and
    how many stay pending to be tried again (claimed after bus.claim_idle)."""
    acked = [(d.stream, d.entry) for d in batch.dead]
    retried = 0
    for (key, env, _sender), count in batch.good:
        stream, _, entry_id = key.partition("\n")
        outcome = outcomes[key]
        if outcome.kind == "done":
            acked.append((stream, entry_id))
        elif outcome.kind == "dead" or count >= limit:
            reason = outcome.reason
            if outcome.kind != "dead":
                reason = f"{reason} (after {count} deliveries)"
            batch.dead.append(Dead(stream, entry_id, batch.raws[key], reason, count, env.id))
            acked.append((stream, entry_id))
        else:
            retried += 1
    return acked, retried
