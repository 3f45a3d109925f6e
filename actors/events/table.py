"""The event table of docs/agents.md, made from the event types (``python -m actors.events``)."""

from __future__ import annotations

import msgspec

from actors.events.kinds import EVENT_TYPES, EnvelopeRefused

__all__ = ["table"]


# -- the documented table ---------------------------------------------------------------------------
def _fields(kind: type[msgspec.Struct], *, skip: str = "") -> str:
    names = [f.encode_name for f in msgspec.structs.fields(kind) if f.encode_name != skip]
    return ", ".join(f"`{n}`" for n in names)


def _meaning(kind: type) -> str:
    return " ".join((kind.__doc__ or "").split()).replace("``", "`")


def table(prefix: str = "jarvis:") -> str:
    """The Markdown table of every event, as docs/agents.md shows it."""
    rows = ["| channel | type | when | data |", "|---|---|---|---|"]
    for kind in EVENT_TYPES:
        rows.append(
            f"| `{prefix}{kind.KIND}` | `{kind.TYPE}` | {_meaning(kind)} | {_fields(kind)} |"
        )
    rows.append(
        f"| `{prefix}inbox:NAME:replies` | `{EnvelopeRefused.TYPE}` | "
        f"{_meaning(EnvelopeRefused)} | {_fields(EnvelopeRefused, skip='type')} |"
    )
    return "\n".join(rows) + "\n"
