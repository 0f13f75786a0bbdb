"""structlog set-up: one event a line on stderr, secrets redacted, written
by a thread of its own (logwriter.py: a closed or full stderr loses lines,
never stops the worker).

No global structlog configuration is touched, so a host program that embeds
the worker keeps its own: the worker gets a logger built here and passes it on.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger

from syncworker.logwriter import writer_for

_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
_SECRET_KEYS = ("password", "secret", "token", "database_url", "dsn", "conninfo")


def redact(text: str) -> str:
    """Hide passwords in connection URLs and key=value connection strings."""
    if "@" not in text and "=" not in text:
        return text  # neither pattern can match: spares two regex scans per value logged
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    return _KV_PASSWORD.sub(r"\g<head>***", text)


@functools.lru_cache(maxsize=1024)
def _secret_key(key: str) -> bool:
    """Whether a field of this name holds a secret. Every log line asks it of
    each of its fields, and they are nearly always the same few names."""
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_KEYS)


def _redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            if _secret_key(key):
                event[key] = redact(value) if "://" in value or "=" in value else "***"
            else:
                event[key] = redact(value)
    return event


def make_logger(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None
) -> FilteringBoundLogger:
    out = stream or sys.stderr
    json_lines = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact_event,
        renderer,
    ]
    logger: FilteringBoundLogger = structlog.wrap_logger(
        writer_for(out),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        cache_logger_on_first_use=True,
    )
    return logger


class _Forward(logging.Handler):
    """Hands a library's stdlib log records to the worker's structlog logger."""

    def __init__(self, log: FilteringBoundLogger) -> None:
        super().__init__()
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._log.log(
                record.levelno, "library_log", logger=record.name, message=record.getMessage()
            )
        except Exception:  # a log line must never take the worker down
            self.handleError(record)


def forward_library_logs(log: FilteringBoundLogger, name: str = "psycopg") -> None:
    """Route `name`'s stdlib logging (psycopg_pool's connection errors) into
    the worker's event stream, redacted and in its format, instead of
    Python's last-resort handler printing plain text among the JSON lines.

    For the `syncworker run` process only: a host program that embeds the
    worker owns its logging set-up.
    """
    target = logging.getLogger(name)
    target.addHandler(_Forward(log))
    target.propagate = False
