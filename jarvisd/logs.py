"""Logging: structlog JSON lines on stdout, one line per event (DESIGN §11).

- Under journald (``$JOURNAL_STREAM`` names our stdout) each line starts with
  the syslog priority ``<N>`` and carries no timestamp: journald adds both.
- On a TTY, with ``log_format = "auto"``, readable console output.
- Otherwise JSON with an ISO timestamp.

Exceptions are rendered into the JSON object, so a traceback is one line too,
without the frames' local variables (they may hold credentials).
The level is a module setting read by a processor, so SIGHUP can change it
for loggers that already exist.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

__all__ = ["configure", "set_level", "under_journald"]

_LEVELS = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "critical": 50,
    "exception": 40,
}
# syslog priorities (sd-daemon.h): what journald reads from the <N> prefix.
_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "critical": 2,
    "exception": 3,
}
_min_level = 20


def set_level(level: str) -> None:
    global _min_level
    _min_level = _LEVELS[level]


def _filter_level(_logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    if _LEVELS.get(method, 20) < _min_level:
        raise structlog.DropEvent
    return event


def under_journald(stream: TextIO | None = None, env: dict[str, str] | None = None) -> bool:
    """True when ``$JOURNAL_STREAM`` (device:inode) is the stream we write to."""
    env = dict(os.environ) if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    stream = sys.stdout if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
        dev, ino = value.split(":", 1)
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError, AttributeError):
        return False


class _JournalRenderer:
    """JSON with the ``<N>`` priority prefix journald understands."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer()

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> str:
        text = self._json(logger, method, event)
        if isinstance(text, bytes):
            text = text.decode()
        return f"<{_PRIORITY.get(method, 6)}>{text}"


class _StdlibBridge(logging.Handler):
    """Send records of libraries that use ``logging`` (asyncio, aiohttp) through structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger(record.name)
        kwargs: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            kwargs["exc_info"] = record.exc_info
        log.log(record.levelno, record.getMessage(), **kwargs)


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Configure structlog and the stdlib bridge; return the format chosen."""
    stream = sys.stdout if stream is None else stream
    set_level(level)
    journal = under_journald(stream)
    if fmt == "auto":
        fmt = "journal" if journal else ("console" if stream.isatty() else "json")
    elif fmt == "json" and journal:
        fmt = "journal"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _filter_level,
        structlog.processors.add_log_level,
    ]
    if fmt != "journal":
        shared.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    else:
        # Never the frames' local variables: they hold request bodies and headers
        # (passwords, tokens).
        shared += [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]
        renderer = _JournalRenderer() if fmt == "journal" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(logging.WARNING)
    return fmt
