"""Cron maths: when a job fires next, and which fire is due now.

Pure functions over croniter; every datetime in and out is timezone-aware.
Expressions are evaluated in the job's own time zone, so "0 2 * * *" means
02:00 local wall time; croniter resolves DST gaps (a skipped 02:30 fires at
03:00) and folds (an hourly job still fires once per real hour).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

_TICK = timedelta(microseconds=1)


class ScheduleError(ValueError):
    """A cron expression or time zone that cannot be used."""


def validate_expression(expr: str) -> str:
    """Return the expression stripped, or raise ScheduleError saying why."""
    cleaned = " ".join(expr.split())
    fields = cleaned.split(" ")
    if not cleaned.startswith("@") and len(fields) not in (5, 6):
        raise ScheduleError(
            f"cron expression {expr!r} has {len(fields)} fields; "
            "expected 5 (minute hour day month weekday) or 6 (with seconds last)"
        )
    if not croniter.is_valid(cleaned):
        raise ScheduleError(f"invalid cron expression {expr!r}")
    return cleaned


def load_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    # A folder of tzdata ("America") or an over-long name surfaces as OSError.
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ScheduleError(f"unknown time zone {name!r}") from exc


def next_fire(exprs: Sequence[str], tz: ZoneInfo, after: datetime) -> datetime | None:
    """The earliest fire strictly after `after` across all expressions, in UTC."""
    if not exprs:
        return None
    local = after.astimezone(tz)
    # Compared in UTC: two datetimes of one zone compare by wall clock, which
    # puts the two passes through a repeated (DST fall-back) hour in the wrong order.
    return min(croniter(e, local).get_next(datetime).astimezone(UTC) for e in exprs)


def latest_fire(exprs: Sequence[str], tz: ZoneInfo, at_or_before: datetime) -> datetime | None:
    """The latest fire at or before `at_or_before` across all expressions, in UTC."""
    if not exprs:
        return None
    # croniter's get_prev is strict; nudge forward so a fire exactly at
    # `at_or_before` counts as due.
    local = (at_or_before + _TICK).astimezone(tz)
    return max(croniter(e, local).get_prev(datetime).astimezone(UTC) for e in exprs)


def upcoming(exprs: Sequence[str], tz: ZoneInfo, after: datetime, count: int) -> list[datetime]:
    """The next `count` fires after `after`, for `check` and `status`."""
    fires: list[datetime] = []
    cursor = after
    for _ in range(count):
        fire = next_fire(exprs, tz, cursor)
        if fire is None:
            break
        fires.append(fire)
        cursor = fire
    return fires
