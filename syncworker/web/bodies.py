"""The JSON bodies of the HTTP API's writes, read and validated before any
database work: a bad body is a 400 naming the field, and nothing is written.

Pure: no I/O, unit-tested in tests/unit/test_web_bodies.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from typing import Any

from syncworker.triggers import MAX_RUN_AFTER
from syncworker.web.replies import HttpError

MAX_TEXT = 1000  # a reason, a scope


@dataclass(frozen=True)
class TriggerBody:
    scope: str | None
    payload: dict[str, Any]
    run_after: float | None  # seconds


@dataclass(frozen=True)
class PauseBody:
    scope: str | None
    until: datetime | None
    reason: str | None


@dataclass(frozen=True)
class ResumeBody:
    scope: str | None


@dataclass(frozen=True)
class CancelBody:
    reason: str | None


def _object(body: bytes, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The body as a JSON object with only `allowed` keys; empty means {}."""
    if not body.strip():
        return {}
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _bad("the body must be a JSON object")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise _bad(f"unknown field {unknown[0][:100]!r}; known: {', '.join(allowed)}")
    return data


def _no_constant(name: str) -> Any:
    # NaN and Infinity are Python's, not JSON's: PostgreSQL refuses them.
    raise ValueError(f"{name} is not JSON")


def _bad(message: str) -> HttpError:
    return HttpError(HTTPStatus.BAD_REQUEST, message)


def _text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"{key} must be a string")
    if len(value) > MAX_TEXT:
        raise _bad(f"{key} is longer than {MAX_TEXT} characters")
    if key == "scope" and not value:
        raise _bad("scope must not be empty (leave it out for every scope)")
    return value


def trigger(body: bytes) -> TriggerBody:
    data = _object(body, ("scope", "payload", "run_after"))
    payload = data.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise _bad("payload must be a JSON object")
    run_after = data.get("run_after")
    if run_after is not None:
        if isinstance(run_after, bool) or not isinstance(run_after, int | float):
            raise _bad("run_after must be a number of seconds")
        if not math.isfinite(run_after) or run_after < 0:
            raise _bad("run_after must be a non-negative number of seconds")
        if run_after > MAX_RUN_AFTER:
            raise _bad(f"run_after must be at most {MAX_RUN_AFTER:.0f} seconds")
        run_after = float(run_after)
    return TriggerBody(_text(data, "scope"), payload, run_after)


def pause(body: bytes) -> PauseBody:
    data = _object(body, ("scope", "until", "reason"))
    until = None
    raw = data.get("until")
    if raw is not None:
        if not isinstance(raw, str):
            raise _bad("until must be an ISO 8601 time with its offset, e.g. 2026-01-01T12:00:00Z")
        try:
            until = datetime.fromisoformat(raw)
        except ValueError:
            raise _bad(f"until {raw[:100]!r} is not an ISO 8601 time") from None
        if until.tzinfo is None:
            # The server's zone is no one's business on the other end.
            raise _bad("until needs an offset or Z, e.g. 2026-01-01T12:00:00Z")
    return PauseBody(_text(data, "scope"), until, _text(data, "reason"))


def resume(body: bytes) -> ResumeBody:
    return ResumeBody(_text(_object(body, ("scope",)), "scope"))


def cancel(body: bytes) -> CancelBody:
    return CancelBody(_text(_object(body, ("reason",)), "reason"))
