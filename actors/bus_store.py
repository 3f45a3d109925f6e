"""What the bus writes beside the commands: dead letters, refusals told to
agents, and trimmed streams (DESIGN §5)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

__all__ = [
    "TRIM_ROUND",
    "TRIM_STEP",
    "Dead",
    "dead_fields",
    "refusal",
    "stream_id",
    "text",
    "xtrim",
]

# Entries one XTRIM may drop, and one trim round at most (a round holds up
# the reading loop; 1,000,000 per bus.trim_interval is far above any ingest).
TRIM_STEP = 50_000
TRIM_ROUND = 1_000_000


class Dead(msgspec.Struct, frozen=True):
    """An envelope that can never be handled: where it came from, and why."""

    stream: str  # the inbox (stream or channel) it arrived on
    entry: str  # its stream entry id ("" on the PUBLISH path)
    raw: bytes
    reason: str
    count: int
    id: str = ""  # the envelope's id, where it could be read


# A dead letter keeps the envelope's first bytes (the reason is the record;
# the envelope is its sender's own): an agent filling the dead-letter stream
# with large envelopes costs at most bus.dead_max_length times this.
DEAD_ENVELOPE_BYTES = 8192


def dead_fields(d: Dead, path: str, consumer: str) -> dict[Any, Any]:
    return {
        "envelope": d.raw[:DEAD_ENVELOPE_BYTES],
        "reason": d.reason[:1000],
        "deliveries": d.count,
        "entry": d.entry,
        "inbox": d.stream,
        "path": path,
        "consumer": consumer,
        "at": _now(),
    }


_encode = msgspec.json.Encoder().encode


def refusal(d: Dead, path: str) -> bytes:
    """What the agent hears on its replies channel."""
    return _encode(
        {
            "type": "envelope.refused",
            "id": d.id,
            "entry": d.entry,
            "path": path,
            "reason": d.reason[:1000],
            "at": _now(),
        }
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def xtrim(client: Any, stream: str, **how: Any) -> int:
    """XTRIM ~ in steps until nothing more goes. One XTRIM ~ drops at most
    its LIMIT (Redis' default: 10,000), less than one trim interval's
    ingest under load: trimming once per interval, the stream would keep
    what was long finished (hundreds of MB after a flood)."""
    total = 0
    while total < TRIM_ROUND:
        n = int(await client.xtrim(stream, approximate=True, limit=TRIM_STEP, **how))
        if n == 0:
            break
        total += n
    return total


def stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms or 0), int(seq or 0)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
