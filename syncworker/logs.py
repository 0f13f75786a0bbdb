"""structlog set-up: one event a line on stderr, secrets redacted.

No global structlog configuration is touched, so a host program that embeds
the worker keeps its own: the worker gets a logger built here and passes it on.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger

_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
_SECRET_KEYS = ("password", "secret", "token", "database_url", "dsn", "conninfo")


def redact(text: str) -> str:
    """Hide passwords in connection URLs and key=value connection strings."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    return _KV_PASSWORD.sub(r"\g<head>***", text)


def _redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            if any(word in key.lower() for word in _SECRET_KEYS):
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
        structlog.PrintLogger(out),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        cache_logger_on_first_use=True,
    )
    return logger
