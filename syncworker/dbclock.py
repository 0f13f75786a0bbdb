"""The database's clock, as this worker reads it: cron decides by it.

Several workers claim each cron fire through the database, so they must
agree on when a fire is due. Their own clocks may not (a host an hour off,
NTP not running): one ahead would take every fire early and move
`last_fire_at` into the future, one behind would never fire. So the
scheduler reads the database's clock at each pass and schedules by it; the
claim itself also refuses a fire later than the database's now (db/sql/queries/fires.sql).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker.db import session

# An offset past this is logged (`clock_skew`): a host clock that is off
# tells of a broken NTP set-up, which other software on it will suffer from.
SKEW_WARN = 1.0
# Said again only when the offset moved by this much since last said.
SKEW_CHANGE = 0.5


class DbClock:
    def __init__(self, log: FilteringBoundLogger) -> None:
        self._log = log
        self.offset = 0.0  # the database's clock minus ours, in seconds
        self._said: float | None = None

    def now(self) -> datetime:
        """The database's time now, by our clock and the last offset read."""
        return datetime.now(UTC) + timedelta(seconds=self.offset)

    async def read(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Read the offset: the database's clock_timestamp() against the
        middle of our round trip for it."""
        sent = time.time()
        theirs = await session.clock(conn)
        back = time.time()
        if theirs is None:
            return
        self.offset = theirs.timestamp() - (sent + back) / 2
        self._report()

    def _report(self) -> None:
        skewed = abs(self.offset) > SKEW_WARN
        if skewed and (self._said is None or abs(self.offset - self._said) > SKEW_CHANGE):
            self._log.warning(
                "clock_skew",
                offset_ms=round(self.offset * 1000),
                note="cron fires follow the database's clock",
            )
            self._said = self.offset
        elif not skewed and self._said is not None:
            self._log.info("clock_skew_resolved", offset_ms=round(self.offset * 1000))
            self._said = None
