"""The agent protocol's envelopes: what parses, and why the rest does not."""

from __future__ import annotations

import json
from typing import Any

import pytest

from actors.envelope import (
    CacheInvalidate,
    CommandCompleted,
    CommandRequested,
    Malformed,
    parse,
    type_of,
)

LIMIT = 65_536


def envelope(**overrides: Any) -> bytes:
    doc: dict[str, Any] = {
        "v": 1,
        "id": "client-unique-1",
        "type": "command.requested",
        "source": "pc-agent",
        "ts": "2026-11-28T15:00:00Z",
        "userId": 7,
        "data": {
            "action": "delete_file",
            "type": "voice",
            "parameters": {"path": "/home/u/important.pdf"},
            "description": "Delete important document.pdf",
        },
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


def test_the_design_example_parses_with_its_request_id_defaulting_to_the_envelope_id() -> None:
    env = parse(envelope(), LIMIT)
    assert isinstance(env, CommandRequested)
    assert (env.user_id, env.source, env.data.action) == (7, "pc-agent", "delete_file")
    assert env.request_id == "client-unique-1"
    assert type_of(env) == "command.requested"
    with_own = parse(envelope(data={"action": "x", "requestId": "r-9"}), LIMIT)
    assert isinstance(with_own, CommandRequested)
    assert with_own.request_id == "r-9"


def test_status_reports_and_cache_invalidations_parse() -> None:
    done = parse(
        envelope(type="command.completed", data={"requestId": "r-1", "durationMs": 42}), LIMIT
    )
    assert isinstance(done, CommandCompleted)
    assert done.data.duration_ms == 42
    inv = parse(envelope(type="cache.invalidate", data={"namespace": "svc", "tags": ["t"]}), LIMIT)
    assert isinstance(inv, CacheInvalidate)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json at all", "malformed"),
        (b'{"v": 1, "id": "x", "type": "command.requested"', "malformed"),
        (b"[1, 2]", "invalid"),
        (b"\xff\xfe", "not UTF-8"),
        (envelope(type="user.exploded"), "unknown type 'user.exploded'"),
        (envelope(v=2), "invalid"),
        (envelope(userId="seven"), "invalid"),
        (envelope(userId=2**64), "invalid"),
        (envelope(data={"action": ""}), "invalid"),
        (envelope(data={"action": "x", "riskScore": 101}), "invalid"),
        (envelope(data={"action": "x\u0000y"}), "invalid"),
        (envelope(type="command.started", data={}), "names no command"),
        (envelope(type="cache.invalidate", data={"namespace": "bad ns"}), "invalid"),
        (envelope(data={"action": "x", "description": "d" * 70_000}), "oversized"),
        (b"[" * 5000 + b"]" * 5000, "invalid"),
    ],
)
def test_anything_else_is_malformed_with_a_reason_and_never_raises(raw: bytes, reason: str) -> None:
    result = parse(raw, LIMIT)
    assert isinstance(result, Malformed)
    assert reason in result.reason


def test_an_invalid_envelope_keeps_its_type_and_id_for_the_dead_letter() -> None:
    result = parse(envelope(type="command.failed", data={"commandId": "x"}), LIMIT)
    assert isinstance(result, Malformed)
    assert (result.type, result.id) == ("command.failed", "client-unique-1")
