"""Store.enqueue_fire as the database runs it: a cron fire claimed and its
runs enqueued in one statement, once per fire across instances, and nothing
claimed when the enqueue is refused."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from syncworker.db import Store
from tests.db.test_trigger_sql import JOBS  # solo, pfa (two scopes), off (disabled)
from tests.harness import cli, query, write_config

# A fire due an hour ago, after the jobs' last fire (set back below): the
# claim refuses fires not yet due by the database's clock.
FIRE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


@pytest.fixture
def url(database_url: str, tmp_path: Any) -> str:
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0  # and registers the jobs
    query(
        database_url,
        "UPDATE syncworker.jobs SET last_fire_at = now() - interval '2 hours' RETURNING name",
    )
    return database_url


def test_a_fire_not_yet_due_by_the_database_clock_is_refused(url: str) -> None:
    """A worker whose clock runs ahead would name a fire early: not claimed,
    and last_fire_at stays where it was, so the fire is taken when due."""
    early = datetime.now(UTC) + timedelta(minutes=30)
    before = _last_fire(url, "solo")
    assert _enqueue(url, "solo", early) is None
    assert _enqueue(url, "solo", early, run=False) is None
    assert _last_fire(url, "solo") == before
    assert query(url, "SELECT count(*) FROM syncworker.runs") == [(0,)]


def _enqueue(url: str, job: str, fire: datetime, *, run: bool = True) -> Any:
    async def go() -> Any:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await Store("syncworker", "sync_events").enqueue_fire(conn, job, fire, run=run)

    return asyncio.run(go())


def _last_fire(url: str, job: str) -> datetime | None:
    [(last,)] = query(url, "SELECT last_fire_at FROM syncworker.jobs WHERE name = %s", (job,))
    return last


def test_a_fire_is_claimed_once_with_one_run_per_scope(url: str) -> None:
    made = _enqueue(url, "pfa", FIRE)
    assert [created for _, created in made] == [True, True]
    rows = query(
        url,
        "SELECT id, scope, status, source, triggered_by, scheduled_for FROM syncworker.runs"
        " ORDER BY id",
    )
    assert [r[0] for r in rows] == [run_id for run_id, _ in made]
    assert [r[1:] for r in rows] == [
        ("RIO", "pending", "cron", "cron", FIRE),
        ("HOU", "pending", "cron", "cron", FIRE),
    ]
    assert _last_fire(url, "pfa") == FIRE
    # The same fire again, as another instance would see it: taken.
    assert _enqueue(url, "pfa", FIRE) is None
    assert query(url, "SELECT count(*) FROM syncworker.runs") == [(2,)]


def test_a_fire_not_to_run_is_claimed_without_runs(url: str) -> None:
    assert _enqueue(url, "solo", FIRE, run=False) == []
    assert _last_fire(url, "solo") == FIRE
    assert query(url, "SELECT count(*) FROM syncworker.runs") == [(0,)]
    assert _enqueue(url, "solo", FIRE) is None  # claimed: not run later either


def test_a_refused_enqueue_leaves_the_fire_unclaimed(url: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="disabled"):
        _enqueue(url, "off", FIRE)
    assert _last_fire(url, "off") < FIRE
    assert query(url, "SELECT count(*) FROM syncworker.runs") == [(0,)]
