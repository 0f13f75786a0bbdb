"""One scheduler pass at a given time, with a fake store and clock: which
fires it enqueues (and with run=False, as a misfire baseline), what it tells
the executor, and how long it sleeps. No database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from syncworker.config import JobConfig, Settings
from syncworker.daemon.catalog import Catalog, Snapshot
from syncworker.daemon.scheduler import MISFIRE_GRACE, Scheduler

T0 = datetime(2026, 12, 3, 9, 0, 0, tzinfo=UTC)


class FakeStore:
    def __init__(self) -> None:
        self.fires: list[tuple[str, datetime, bool]] = []
        self.next_fire: dict[str, datetime | None] = {}
        self.hold_end: datetime | None = None

    async def enqueue_fire(
        self, conn: Any, name: str, due: datetime, *, run: bool
    ) -> list[tuple[int, bool]] | None:
        self.fires.append((name, due, run))
        return [(len(self.fires), True)]

    async def set_next_fire(self, conn: Any, upcoming: dict[str, datetime | None]) -> None:
        self.next_fire = dict(upcoming)

    async def next_release(self, conn: Any) -> datetime | None:
        return self.hold_end


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.at = now

    async def read(self, conn: Any) -> None:
        return None

    def now(self) -> datetime:
        return self.at


@asynccontextmanager
async def no_connection() -> AsyncIterator[Any]:
    yield None


def scheduler(jobs: dict[str, JobConfig], now: datetime) -> tuple[Scheduler, FakeStore, list[str]]:
    settings = Settings(database_url="postgresql://unused", jobs=jobs)
    catalog = Catalog(Snapshot(settings, {}, {name: None for name in jobs}))
    store, woken = FakeStore(), []
    s = Scheduler(
        store=store,  # type: ignore[arg-type]
        catalog=catalog,
        clock=FakeClock(now),
        connect=no_connection,
        db_up=asyncio.Event(),
        stopping=asyncio.Event(),
        log=structlog.get_logger(),
        wake=lambda: woken.append("wake"),
        passed=lambda: None,
    )
    return s, store, woken


EVERY_5 = JobConfig(schedule=("*/5 * * * *",), steps=["sw_testjobs:record"])


def test_the_first_pass_only_records_a_baseline() -> None:
    s, store, woken = scheduler({"sync": EVERY_5}, T0 + timedelta(seconds=30))
    s.start_from({"sync": None})
    delay = asyncio.run(s.pass_once(T0 + timedelta(seconds=30)))
    assert store.fires == [("sync", T0, False)]  # never seen firing: no run
    assert woken == []
    assert delay == 270.0
    assert store.next_fire == {"sync": T0 + timedelta(minutes=5)}


def test_a_due_fire_is_enqueued_once_and_wakes_the_executor() -> None:
    s, store, woken = scheduler({"sync": EVERY_5}, T0 + timedelta(seconds=1))
    s.start_from({"sync": T0 - timedelta(minutes=5)})
    asyncio.run(s.pass_once(T0 + timedelta(seconds=1)))
    asyncio.run(s.pass_once(T0 + timedelta(seconds=2)))  # the same fire: nothing more
    assert store.fires == [("sync", T0, True)]
    assert woken == ["wake"]


def test_a_missed_fire_with_misfire_skip_is_recorded_not_run() -> None:
    job = EVERY_5.model_copy(update={"misfire": "skip"})
    late = T0 + timedelta(seconds=MISFIRE_GRACE + 1)
    s, store, woken = scheduler({"sync": job}, late)
    s.start_from({"sync": T0 - timedelta(minutes=5)})
    asyncio.run(s.pass_once(late))
    assert store.fires == [("sync", T0, False)]
    assert woken == []


def test_a_disabled_or_unscheduled_job_is_not_fired() -> None:
    jobs = {
        "off": EVERY_5.model_copy(update={"enabled": False}),
        "manual": JobConfig(steps=["sw_testjobs:record"]),
    }
    s, store, _ = scheduler(jobs, T0)
    s.start_from({})
    delay = asyncio.run(s.pass_once(T0))
    assert store.fires == []
    assert delay == 300.0  # nothing scheduled: the safety net


def test_a_scopes_refresh_overtaken_by_a_reload_is_dropped() -> None:
    """The old scopes_sql's answer must not land in the new configuration."""
    old = EVERY_5.model_copy(update={"scopes_sql": "SELECT 'old'"})
    new = EVERY_5.model_copy(update={"scopes_sql": "SELECT 'new'"})
    s, store, _ = scheduler({"sync": old}, T0)
    catalog: Catalog = s._catalog
    set_scopes: list[Any] = []

    async def fetch(conn: Any, query: str) -> tuple[str, ...]:
        # The reload lands while the old query runs.
        settings = Settings(database_url="postgresql://unused", jobs={"sync": new})
        catalog.replace(Snapshot(settings, {}, {"sync": ("fresh",)}))
        return ("old",)

    async def record(conn: Any, name: str, scopes: tuple[str, ...]) -> None:
        set_scopes.append((name, scopes))

    import syncworker.daemon.scheduler as module

    store.set_scopes = record  # type: ignore[attr-defined]
    real, module.fetch_scopes = module.fetch_scopes, fetch  # type: ignore[assignment]
    try:
        asyncio.run(s._refresh_scopes(None, "sync", old))  # type: ignore[arg-type]
    finally:
        module.fetch_scopes = real
    assert catalog.now.scopes["sync"] == ("fresh",)
    assert set_scopes == []


def test_the_end_of_a_hold_wakes_the_pass_and_then_the_executor() -> None:
    s, store, woken = scheduler({"sync": EVERY_5}, T0 + timedelta(seconds=1))
    s.start_from({"sync": T0})
    store.hold_end = T0 + timedelta(seconds=20)  # paused until then
    delay = asyncio.run(s.pass_once(T0 + timedelta(seconds=1)))
    assert 19.0 < delay < 19.1  # the hold's end, not the fire at T0 + 5 min
    assert woken == []
    store.hold_end = None  # it ended: none left in force
    asyncio.run(s.pass_once(T0 + timedelta(seconds=21)))
    assert woken == ["wake"]  # its waiting runs may start


def test_an_end_passed_by_the_databases_clock_only_still_wakes() -> None:
    """Our clock a hair before the end, the database's just past it: the
    end is gone from the answer, and the executor must still be woken."""
    s, store, woken = scheduler({"sync": EVERY_5}, T0)
    s.start_from({"sync": T0})
    store.hold_end = T0 + timedelta(seconds=20)
    asyncio.run(s.pass_once(T0 + timedelta(seconds=1)))
    store.hold_end = None
    asyncio.run(s.pass_once(T0 + timedelta(seconds=19, microseconds=999_000)))
    assert woken == ["wake"]
