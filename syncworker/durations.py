"""Reading the times operators type: `--for 2h` and `--until TIME` (pure)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Far enough for any hold, near enough that now + it is a valid time.
MAX_DURATION = timedelta(days=3650)
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


class DurationError(ValueError):
    pass


def parse_duration(text: str) -> timedelta:
    """`90`, `90s`, `30m`, `2h`, `1d`, `1h30m`: a positive length of time."""
    raw = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", raw):
        seconds = float(raw)
    else:
        parts = _PART.findall(raw)
        if not parts or "".join(n + u for n, u in parts) != raw:
            raise DurationError(
                f"{text!r} is not a duration: write it as 90s, 30m, 2h, 1d or 1h30m"
            )
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise DurationError(f"{text!r} is not a positive duration")
    if seconds > MAX_DURATION.total_seconds():
        raise DurationError(f"{text!r} is too long: at most {MAX_DURATION.days} days")
    return timedelta(seconds=seconds)


def parse_time(text: str) -> datetime:
    """An ISO 8601 time (`2026-12-03T18:00`, `2026-12-03 18:00+01:00`); one
    without a UTC offset is this machine's local time."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise DurationError(
            f"{text!r} is not a time: write it as 2026-12-03T18:00 (local) or with an offset"
            " (2026-12-03T18:00+00:00)"
        ) from None
    when = when if when.tzinfo is not None else when.astimezone()
    if when.year >= 9999:
        raise DurationError(f"{text!r} is too far: give a time before the year 9999")
    return when
