"""The scheduler: cron fires, the misfire policy (misfire = "all": a backfill
run per missed fire), scopes_sql refreshes, and the ends of waits (a hold's
until, a delayed run's not_before): it wakes the executor when one ends.

It sleeps until the soonest next fire (or SCHEDULER_MAX_SLEEP, a safety net
against wall-clock jumps), or until `reschedule()`. Each fire is claimed in
the database once per (job, scheduled_for), whatever the number of workers
(store.enqueue_fire); `pass_once(now)` is one pass at a given time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker import schedule
from syncworker.aio import wait_event
from syncworker.config import JobConfig
from syncworker.daemon.catalog import Catalog
from syncworker.db import Store, fetch_scopes
from syncworker.dberrors import TRANSIENT, first_line

# A fire noticed later than this counts as missed (misfire policy applies).
MISFIRE_GRACE = 60.0
# Longest the scheduler sleeps without re-reading the clock: a safety net
# against wall-clock jumps (suspend, NTP steps); fires still wake it exactly.
SCHEDULER_MAX_SLEEP = 300.0
# How long after a wait's end the scheduler wakes to let its runs start.
RELEASE_MARGIN = 0.01

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class Clock(Protocol):
    async def read(self, conn: psycopg.AsyncConnection[Any]) -> None: ...

    def now(self) -> datetime: ...


class Scheduler:
    def __init__(
        self,
        *,
        store: Store,
        catalog: Catalog,
        clock: Clock,
        connect: Connect,
        db_up: asyncio.Event,
        stopping: asyncio.Event,
        log: FilteringBoundLogger,
        wake: Callable[[], None],
        passed: Callable[[], None],
    ) -> None:
        """`wake` is called when a fire enqueued runs; `passed` after each
        pass while serving (systemd's status shows the next fire)."""
        self._store = store
        self._catalog = catalog
        self._clock = clock
        self._connect = connect
        self._db_up = db_up
        self._stopping = stopping
        self._log = log
        self._wake = wake
        self._passed = passed
        self._reschedule = asyncio.Event()
        # The last fire handled per job: its one owner.
        self._fire_cursor: dict[str, datetime | None] = {}
        self._next_fires: dict[str, datetime | None] = {}
        # When the soonest wait ends by itself (a hold's until, a delayed
        # run's not_before), as last read.
        self._release: datetime | None = None
        # A {"delayed"} wake heard since the last pass (delayed()).
        self._delay_heard = False

    def reschedule(self) -> None:
        """Pass again now: the jobs or the database changed."""
        self._reschedule.set()

    def delayed(self) -> None:
        """A run was delayed (a {"delayed"} wake): pass again now, and wake the
        executor after the pass's read. A not_before that passed before the
        read (a short delay, a late commit) is not in the read: the claim
        then finds it; one after the read is in it."""
        self._delay_heard = True
        self._reschedule.set()

    @property
    def next_fires(self) -> Mapping[str, datetime | None]:
        return self._next_fires

    def start_from(self, fired: Mapping[str, datetime | None]) -> None:
        """The fires the database last recorded, per job (store.fire_state)."""
        self._fire_cursor = dict(fired)

    def rebase(
        self,
        old: Mapping[str, JobConfig],
        new: Mapping[str, JobConfig],
        fired: Mapping[str, datetime | None],
    ) -> None:
        """After a reload: a job whose schedule changed got a new misfire
        baseline in the database; the others keep the fire this worker last
        handled; a removed job is forgotten."""
        for name, job in new.items():
            was = old.get(name)
            if was is None or (was.schedule, was.timezone) != (job.schedule, job.timezone):
                self._fire_cursor[name] = fired.get(name)
        for name in set(self._fire_cursor) - set(new):
            self._fire_cursor.pop(name, None)

    async def run(self) -> None:
        while True:
            await self._db_up.wait()
            self._reschedule.clear()
            try:
                delay = await self._read_clock_and_pass()
            except TRANSIENT as exc:
                self._log.warning("schedule_pass_failed", error=first_line(exc))
                await self._db_up.wait()
                await asyncio.sleep(0.1)  # let the pool notice the outage is over
                continue
            await wait_event(self._reschedule, delay)

    async def _read_clock_and_pass(self) -> float:
        """Times are the database's (dbclock.py): every worker decides by one clock."""
        async with self._connect() as conn:
            await self._clock.read(conn)
        return await self.pass_once(self._clock.now())

    async def pass_once(self, now: datetime) -> float:
        """Enqueue every fire due at `now`, and wake the executor when a wait
        (a hold of pause(), a delayed run) ended since the last pass; returns
        seconds until the next fire or the next end of a wait."""
        upcoming: dict[str, datetime | None] = {}
        for name, job in self._catalog.now.jobs.items():
            if not job.enabled or not job.schedule:
                continue
            zone = job.zone
            due = schedule.latest_fire(job.schedule, zone, now)
            last = self._fire_cursor.get(name)
            if due is not None and (last is None or due > last):
                await self._fire(name, job, due, now, last)
                self._fire_cursor[name] = due
            upcoming[name] = schedule.next_fire(job.schedule, zone, now)
        heard, self._delay_heard = self._delay_heard, False
        try:
            async with self._connect() as conn:
                await self._store.set_next_fire(conn, upcoming)
                release = await self._store.next_release(conn)
        except BaseException:
            # The pass is retried (run()): the wake it owes goes with it.
            self._delay_heard = self._delay_heard or heard
            raise
        self._next_fires = upcoming
        if heard or (self._release is not None and self._release != release):
            # The end we knew of passed (by our clock or only by the
            # database's, a moment later) or was lifted: the runs it kept
            # waiting may start.
            self._wake()
        self._release = release
        if not self._stopping.is_set():
            self._passed()
        soonest = min((t for t in upcoming.values() if t is not None), default=None)
        margin = 0.0
        if release is not None and (soonest is None or release < soonest):
            # Past the end by the database's clock, where the claims test it.
            soonest, margin = release, RELEASE_MARGIN
        if soonest is None:
            return SCHEDULER_MAX_SLEEP
        seconds = (soonest - self._clock.now()).total_seconds() + margin
        return min(max(seconds, 0.0), SCHEDULER_MAX_SLEEP)

    async def _fire(
        self, name: str, job: JobConfig, due: datetime, now: datetime, last: datetime | None
    ) -> None:
        late = (now - due).total_seconds()
        # With no baseline the job has never been seen firing: start counting now.
        baseline = last is None
        run = not baseline and not (job.misfire == "skip" and late > MISFIRE_GRACE)
        missed: list[datetime] = []
        capped = False
        if run and last is not None and job.misfire == "all":
            missed, capped = schedule.latest_fires(
                job.schedule, job.zone, last, due, job.misfire_limit
            )
        async with self._connect() as conn:
            if run and job.scopes_sql:
                await self._refresh_scopes(conn, name, job)
            if len(missed) > 1:
                await self._backfill_missed(conn, name, missed, capped)
                return
            try:
                result = await self._store.enqueue_fire(conn, name, due, run=run)
            except (psycopg.errors.UniqueViolation, psycopg.errors.InvalidParameterValue) as exc:
                self._log.warning("cron_fire_refused", job=name, scheduled_for=due, error=str(exc))
                return
        if result is None:
            self._log.debug("cron_fire_taken", job=name, scheduled_for=due)
            return
        if run and not result:
            # Every key of the job is held (pause()): claimed, not run, not caught up.
            self._log.info("cron_fire_held", job=name, scheduled_for=due.isoformat())
        elif run:
            self._log.info(
                "cron_fired",
                job=name,
                scheduled_for=due.isoformat(),
                late_ms=round(late * 1000),
                missed=late > MISFIRE_GRACE,
                runs=[run_id for run_id, _ in result],
            )
            self._wake()
        elif not baseline:
            self._log.info("misfire_skipped", job=name, scheduled_for=due.isoformat())

    async def _backfill_missed(
        self,
        conn: psycopg.AsyncConnection[Any],
        name: str,
        fires: list[datetime],
        capped: bool,
    ) -> None:
        """misfire = "all": one backfill run per missed fire (the latest
        misfire_limit of them), claimed with the latest fire in one
        statement, so one instance alone queues them."""
        try:
            runs = await self._store.enqueue_missed_fires(conn, name, fires)
        except psycopg.errors.InvalidParameterValue as exc:
            self._log.warning(
                "cron_fire_refused", job=name, scheduled_for=fires[-1], error=str(exc)
            )
            return
        if runs is None:
            self._log.debug("cron_fire_taken", job=name, scheduled_for=fires[-1])
            return
        self._log.info(
            "misfire_backfilled",
            job=name,
            fires=len(fires),
            first=fires[0].isoformat(),
            last=fires[-1].isoformat(),
            capped=capped,
            runs=runs,
        )
        if runs:
            self._wake()

    async def _refresh_scopes(
        self, conn: psycopg.AsyncConnection[Any], name: str, job: JobConfig
    ) -> None:
        assert job.scopes_sql is not None
        try:
            scopes = await fetch_scopes(conn, job.scopes_sql)
        except psycopg.OperationalError:
            raise  # the scheduler's outage handling
        except psycopg.Error as exc:
            # The query broke (a table renamed, a grant revoked): the fire
            # goes ahead with the scopes known so far, and the scheduler with
            # it; raising would end the daemon.
            self._log.error(
                "scopes_sql_failed",
                job=name,
                error=first_line(exc, repr(exc)),
                kept=list(self._catalog.now.scopes.get(name) or ()),
            )
            return
        if self._catalog.now.jobs.get(name) is not job:
            return  # reloaded meanwhile: this query may be the old one's
        if scopes != self._catalog.now.scopes.get(name):
            self._log.info("scopes_changed", job=name, scopes=list(scopes))
            self._catalog.replace(self._catalog.now.with_job_scopes(name, scopes))
            await self._store.set_scopes(conn, name, scopes)
