"""The agent protocol's envelopes (DESIGN §5): what agents publish on ``bus.stream`` (XADD ``envelope`` field, or PUBLISH
on the channel of the same name). One JSON object, camelCase, a tagged union
on ``type``. ``parse`` never raises: it returns the envelope or the reason it
is not one, which goes to the dead-letter stream.

What the daemon sends back (events, refusals) is in ``actors.events``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from actors.data.model import (
    NO_NUL,
    Action,
    CommandType,
    Description,
    JsonObject,
    JsonValue,
    RequestId,
    RowId,
    Score,
    Source,
    _HasAction,
    nul_path,
)

__all__ = [
    "CacheInvalidate",
    "CommandCancelled",
    "CommandCompleted",
    "CommandFailed",
    "CommandRequested",
    "CommandStarted",
    "Envelope",
    "Malformed",
    "parse",
    "type_of",
]

Namespace = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
CacheKey = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class _Data(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    pass


class CommandRequestedData(_HasAction, _Data, frozen=True):
    action: Action
    type: CommandType = "agent"
    parameters: JsonObject = msgspec.field(default_factory=dict)
    description: Description = ""
    risk_score: Score | None = None  # a suggestion: raises the policy score, never lowers it
    request_id: RequestId | None = None  # default: the envelope id


class _CommandRef(_Data, frozen=True):
    """Which command: its id, or the requestId it was created with."""

    command_id: RowId | None = None
    request_id: RequestId | None = None


class CommandStartedData(_CommandRef, frozen=True):
    pass


class CommandCompletedData(_CommandRef, frozen=True):
    result: JsonValue = None
    duration_ms: Annotated[int, msgspec.Meta(ge=0, le=2**53)] | None = None


class CommandFailedData(_CommandRef, frozen=True):
    error: Annotated[str, msgspec.Meta(max_length=4000, pattern=NO_NUL)] = "failed"
    result: JsonValue = None
    duration_ms: Annotated[int, msgspec.Meta(ge=0, le=2**53)] | None = None


class CommandCancelledData(_CommandRef, frozen=True):
    reason: Description | None = None


class CacheInvalidateData(_Data, frozen=True):
    namespace: Namespace = "default"
    keys: Annotated[list[CacheKey], msgspec.Meta(max_length=1000)] = msgspec.field(
        default_factory=list
    )
    tags: Annotated[list[CacheKey], msgspec.Meta(max_length=64)] = msgspec.field(
        default_factory=list
    )
    pattern: CacheKey | None = None


class _Envelope(msgspec.Struct, frozen=True, kw_only=True, rename="camel", tag_field="type"):
    v: Literal[1]
    id: RequestId
    source: Source = ""
    ts: datetime | None = None
    user_id: RowId | None = None


class CommandRequested(_Envelope, frozen=True, tag="command.requested"):
    data: CommandRequestedData

    @property
    def request_id(self) -> str:
        return self.data.request_id or self.id


class CommandStarted(_Envelope, frozen=True, tag="command.started"):
    data: CommandStartedData


class CommandCompleted(_Envelope, frozen=True, tag="command.completed"):
    data: CommandCompletedData


class CommandFailed(_Envelope, frozen=True, tag="command.failed"):
    data: CommandFailedData


class CommandCancelled(_Envelope, frozen=True, tag="command.cancelled"):
    data: CommandCancelledData


class CacheInvalidate(_Envelope, frozen=True, tag="cache.invalidate"):
    data: CacheInvalidateData


Envelope = (
    CommandRequested
    | CommandStarted
    | CommandCompleted
    | CommandFailed
    | CommandCancelled
    | CacheInvalidate
)
TYPES = frozenset(
    {
        "command.requested",
        "command.started",
        "command.completed",
        "command.failed",
        "command.cancelled",
        "cache.invalidate",
    }
)
_decoder: msgspec.json.Decoder[Envelope] = msgspec.json.Decoder(Envelope)
_peek = msgspec.json.Decoder(dict[str, Any])


class Malformed(msgspec.Struct, frozen=True):
    """Not an envelope jarvisd takes: why, for the dead-letter entry."""

    reason: str
    type: str = ""
    id: str = ""


def parse(raw: bytes | str, max_bytes: int) -> Envelope | Malformed:
    """The envelope in ``raw``, or why it is not one. Never raises."""
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > max_bytes:
        return Malformed(f"oversized: {len(data)} bytes (bus.max_envelope_bytes is {max_bytes})")
    try:
        data.decode()
        envelope = _decoder.decode(data)
    except UnicodeError:
        return Malformed("malformed: not UTF-8")
    except RecursionError:
        return Malformed("malformed: nested too deeply")
    except msgspec.ValidationError as exc:
        kind, ident = _describe(data)
        if kind and kind not in TYPES:
            return Malformed(f"unknown type {kind[:100]!r}", kind[:100], ident)
        return Malformed(f"invalid: {exc}", kind[:100], ident)
    except msgspec.DecodeError as exc:
        return Malformed(f"malformed: {exc}")
    if b"\\u0000" in data:
        # PostgreSQL stores no NUL in text or jsonb: refused here, where the
        # reason can be told, rather than by the database.
        where = nul_path(_peek.decode(data))
        if where is not None:
            return Malformed(
                f"invalid: NUL character (\\u0000) at {where[:200]}; PostgreSQL cannot store it",
                type_of(envelope),
                envelope.id,
            )
    if (
        isinstance(envelope, CommandStarted | CommandCompleted | CommandFailed | CommandCancelled)
        and envelope.data.command_id is None
        and envelope.data.request_id is None
    ):
        return Malformed(
            "invalid: data names no command (commandId or requestId)",
            type_of(envelope),
            envelope.id,
        )
    return envelope


def type_of(envelope: Envelope) -> str:
    """The envelope's ``type`` (its tag)."""
    return str(envelope.__struct_config__.tag)


def _describe(data: bytes) -> tuple[str, str]:
    """The type and id of an invalid envelope, where they can be read."""
    try:
        obj = _peek.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return "", ""
    kind, ident = obj.get("type"), obj.get("id")
    return (
        kind if isinstance(kind, str) else "",
        ident[:200] if isinstance(ident, str) else "",
    )
