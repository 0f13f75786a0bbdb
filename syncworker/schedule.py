"""Cron maths: when a job fires next, which fire is due now, and the fires of
a window (misfire = "all", backfill).

Pure functions over croniter; every datetime in and out is timezone-aware.
Expressions are evaluated in the job's own time zone, so "0 2 * * *" means
02:00 local wall time; croniter resolves DST gaps (a skipped 02:30 fires at
03:00) and folds (an hourly job still fires once per real hour).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from itertools import islice, takewhile
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
    return list(islice(_fires_after(exprs, tz, after), count))


def _fires_after(exprs: Sequence[str], tz: ZoneInfo, after: datetime) -> Iterator[datetime]:
    cursor = after
    while (fire := next_fire(exprs, tz, cursor)) is not None:
        yield fire
        cursor = fire


def fires_between(
    exprs: Sequence[str], tz: ZoneInfo, after: datetime, until: datetime, limit: int
) -> list[datetime]:
    """The fires strictly after `after` and at or before `until`, oldest
    first, in UTC; at most `limit` + 1 of them, so a caller can tell a
    window of more than `limit` without walking all of it."""
    inside = takewhile(lambda fire: fire <= until, _fires_after(exprs, tz, after))
    return list(islice(inside, limit + 1))


def latest_fires(
    exprs: Sequence[str], tz: ZoneInfo, after: datetime, at_or_before: datetime, count: int
) -> tuple[list[datetime], bool]:
    """The latest `count` fires strictly after `after` and at or before
    `at_or_before`, oldest first, in UTC, and whether there were more.
    Walks back from the end, so a long outage costs `count` steps, not one
    per fire missed."""
    found: set[datetime] = set()
    more = False
    local = (at_or_before + _TICK).astimezone(tz)
    for expr in exprs:
        walk = croniter(expr, local)
        for taken in range(count + 1):
            fire = walk.get_prev(datetime).astimezone(UTC)
            if fire <= after:
                break
            if taken == count:
                more = True
                break
            found.add(fire)
    fires = sorted(found)
    if len(fires) > count:
        fires, more = fires[-count:], True
    return fires, more
