"""Backfill from Python, the equivalent of `syncworker backfill`: one run per
fire of a job's schedule in a window that has no run yet.

The fires come from the schedule the workers registered in `jobs` (SQL
cannot read cron); backfill() in the database checks the job, the scope and
that every fire is past, and queues the runs. Like trigger_sync, the call
joins the caller's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from syncworker import schedule
from syncworker.control import ControlError, refused
from syncworker.db import queries
from syncworker.db.rows import Backfilled, BackfillJob

# The most fires backfill() takes in one call, --force or not (18_backfill.sql).
MAX_FIRES = 10000
_TICK = timedelta(microseconds=1)
# backfill() takes no fire before it (18_backfill.sql).
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Backfill:
    """What a backfill found and did: every fire of the window, and the runs
    queued for those (and the scopes) that had none yet."""

    job: str
    fires: list[datetime]
    queued: list[Backfilled]
    keys: int = 1  # the scopes backfilled (1 for a job without scopes)

    @property
    def already_ran(self) -> int:
        """Fires (per scope) left alone: they had a run already."""
        return self.keys * len(self.fires) - len(self.queued)


async def backfill(
    conn: psycopg.AsyncConnection[Any],
    job: str,
    start: datetime,
    end: datetime,
    *,
    scope: str | None = None,
    force: bool = False,
    by: str | None = None,
    schema: str = "syncworker",
) -> Backfill:
    """Queue a run per fire of `job`'s schedule from `start` to `end` (both
    included; `end` no later than now) that has no run yet, every scope or
    one. A window of more fires than the job's misfire_limit needs `force`.
    Raises ControlError naming what was wrong, having written nothing."""
    start, end = _aware(start), min(_aware(end), datetime.now(UTC))
    if start < EARLIEST:
        raise ControlError(f"the window starts at {start.isoformat()}: give a time after 1900")
    if start > end:
        raise ControlError(
            f"the window starts at {start.isoformat()}, after it ends at {end.isoformat()}"
        )
    q = queries.for_schema(schema)
    found = await queries.one(conn, q["backfill_job"], {"job": job}, BackfillJob)
    if found is None:
        raise ControlError(f"unknown job {job!r}")
    if not found.enabled:
        raise ControlError(f"job {job!r} is disabled")
    if scope is not None and scope not in (found.scopes or ()):
        known = ", ".join(found.scopes) if found.scopes else "the job has no scopes"
        raise ControlError(f"unknown scope {scope!r} for job {job!r} ({known})")
    if not found.schedule:
        raise ControlError(f"job {job!r} has no schedule: there are no fires to backfill")
    zone = schedule.load_zone(found.timezone)
    limit = MAX_FIRES if force else found.misfire_limit
    fires = schedule.fires_between(found.schedule, zone, start - _TICK, end, limit)
    if len(fires) > limit:
        if force:
            raise ControlError(
                f"the window has more than {MAX_FIRES} fires of job {job!r}:"
                " backfill it in smaller windows"
            )
        raise ControlError(
            f"the window has more than {limit} fires of job {job!r} (its misfire_limit):"
            " give --force (force=True) to queue them all"
        )
    keys = 1 if scope is not None or not found.scopes else len(found.scopes)
    if not fires:
        return Backfill(job, [], [], keys)
    params = {"job": job, "scope": scope, "fires": fires, "by": by}
    with refused():
        queued = await queries.many(conn, q["backfill"], params, Backfilled)
    return Backfill(job, fires, queued, keys)


def _aware(when: datetime) -> datetime:
    # A naive time is this machine's local time, as in the CLI.
    return when if when.tzinfo is not None else when.astimezone()
