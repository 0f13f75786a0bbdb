"""A cron expression in words, for the dashboard: "every 15 minutes",
"daily at 02:30", "Mon-Fri at 09:00". The common shapes only: anything
else is shown as the expression itself, which is never wrong.

Pure; the times are in the job's own time zone (the dashboard says which).
"""

from __future__ import annotations

import re

_DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
_ALIASES = {
    "@yearly": "yearly on Jan 1 at 00:00",
    "@annually": "yearly on Jan 1 at 00:00",
    "@monthly": "monthly on day 1 at 00:00",
    "@weekly": "weekly on Sun at 00:00",
    "@daily": "daily at 00:00",
    "@midnight": "daily at 00:00",
    "@hourly": "every hour at :00",
}
_NUMBER = re.compile(r"\d{1,2}")
_STEP = re.compile(r"\*/(\d{1,2})")


def describe(expression: str) -> str:
    text = expression.strip()
    if text.lower() in _ALIASES:
        return _ALIASES[text.lower()]
    fields = text.split()
    if len(fields) == 6:  # croniter's seconds come last
        *fields, seconds = fields
        if fields == ["*"] * 5:
            if seconds == "*":
                return "every second"
            if step := _STEP.fullmatch(seconds):
                return f"every {step.group(1)} seconds"
        if seconds != "0":
            return expression
    if len(fields) != 5:
        return expression
    minute, hour, dom, month, dow = fields
    if month != "*":
        return expression
    if [minute, hour, dom, dow] == ["*", "*", "*", "*"]:
        return "every minute"
    if (step := _STEP.fullmatch(minute)) and [hour, dom, dow] == ["*", "*", "*"]:
        return f"every {step.group(1)} minutes"
    if not _NUMBER.fullmatch(minute):
        return expression
    if hour == "*" and [dom, dow] == ["*", "*"]:
        return f"every hour at :{int(minute):02d}"
    if (step := _STEP.fullmatch(hour)) and [dom, dow] == ["*", "*"]:
        return f"every {step.group(1)} hours at :{int(minute):02d}"
    if not _NUMBER.fullmatch(hour):
        return expression
    at = f"{int(hour):02d}:{int(minute):02d}"
    if [dom, dow] == ["*", "*"]:
        return f"daily at {at}"
    if dom == "*" and (days := _days(dow)):
        return f"{days} at {at}"
    if dow == "*" and _NUMBER.fullmatch(dom):
        return f"monthly on day {int(dom)} at {at}"
    return expression


def _days(field: str) -> str | None:
    """A day-of-week field as names: "Mon-Fri", "Sat,Sun"; None if unusual."""
    parts = []
    for part in field.split(","):
        low, sep, high = part.partition("-")
        if not (
            low.isdigit() and int(low) <= 7 and (not sep or (high.isdigit() and int(high) <= 7))
        ):
            return None
        parts.append(_DAYS[int(low)] + (f"-{_DAYS[int(high)]}" if sep else ""))
    return ",".join(parts)
