"""Log output: JSON lines, journald priority prefix, actor tags (DESIGN §11)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from jarvisd.logs import configure, under_journald


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def out(tmp_path: Path) -> Iterator[io.TextIOWrapper]:
    with (tmp_path / "log").open("w+") as fh:
        yield fh


def test_json_lines_carry_level_timestamp_and_the_actor(
    out: io.TextIOWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert configure("info", "json", stream=out) == "json"
    structlog.get_logger("jarvisd").bind(actor="cache").info("hello", n=1)
    structlog.get_logger("jarvisd").debug("hidden")
    out.seek(0)
    lines = out.read().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "hello"
    assert event["actor"] == "cache"
    assert event["level"] == "info"
    assert "timestamp" in event


def test_under_journald_lines_start_with_the_priority_and_have_no_timestamp(
    out: io.TextIOWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = os.fstat(out.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert under_journald(out)
    assert configure("info", "auto", stream=out) == "journal"
    log = structlog.get_logger("jarvisd").bind(actor="bus")
    log.warning("slow consumer")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError as exc:
        log.error("failed", exc_info=exc)
    out.seek(0)
    lines = out.read().splitlines()
    assert len(lines) == 2  # the traceback stays on its event's line
    assert lines[0].startswith("<4>{")
    assert lines[1].startswith("<3>{")
    first = json.loads(lines[0][3:])
    assert "timestamp" not in first
    assert json.loads(lines[1][3:])["exception"][0]["exc_value"] == "boom\nsecond line"


def test_journal_stream_of_another_file_is_ignored(
    out: io.TextIOWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not under_journald(out)
    assert configure("info", "auto", stream=out) == "json"  # not a TTY either


def test_console_format_is_readable_text() -> None:
    out = io.StringIO()
    configure("debug", "console", stream=out)
    structlog.get_logger("jarvisd").bind(actor="http").info("listening", port=8017)
    text = out.getvalue()
    assert "listening" in text
    assert "actor=http" in text
    assert not text.lstrip().startswith("{")


def test_the_level_filter_applies_to_loggers_made_before_a_change() -> None:
    out = io.StringIO()
    configure("info", "json", stream=out)
    log = structlog.get_logger("jarvisd").bind(actor="x")
    log.debug("before")
    from jarvisd.logs import set_level

    set_level("debug")
    log.debug("after")
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events == ["after"]
