"""Cron follows the database's clock, whatever the worker host's says
(issue 13). Real daemons under libfaketime (Debian package `faketime`,
installed by `make test`), their clocks an hour ahead or behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Daemon, query, wait_until, write_config
from tests.invariants import assert_invariants

LIBFAKETIME = next(
    iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))),
    Path("/usr/lib/faketime/libfaketime.so.1"),
)

JOBS = """
[jobs.tick]
schedule = "* * * * * *"
steps = ["sw_testjobs:record"]
"""


@pytest.fixture
def skewed(start, tmp_path, database_url):  # type: ignore[no-untyped-def]
    if not LIBFAKETIME.exists():
        pytest.fail(f"{LIBFAKETIME} is missing: `apt-get install faketime` (make test does)")

    def _start(offset: str | None) -> Daemon:
        config = write_config(tmp_path / f"c{offset}.toml", database_url, JOBS)
        if offset is None:
            return start(config)
        env = {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset}
        return start(config, env=env)

    return _start


def _fires_keep_to_the_database_clock(url: str) -> None:
    """Every fire was enqueued within 2 s of its time by the database's clock,
    and none lies ahead of it."""
    [(worst, ahead)] = query(
        url,
        "SELECT max(abs(extract(epoch FROM requested_at - scheduled_for))),"
        " (SELECT last_fire_at > now() + interval '1 second' FROM syncworker.jobs"
        "  WHERE name = 'tick')"
        " FROM syncworker.runs WHERE source = 'cron'",
    )
    assert worst is not None and worst < 2, worst
    assert ahead is False


def _fired(url: str, n: int) -> None:
    wait_until(
        lambda: (
            query(
                url,
                "SELECT count(*) FROM syncworker.runs WHERE source = 'cron' AND status = 'succeeded'",
            )[0][0]
            >= n
        ),
        what=f"{n} cron runs",
    )


@pytest.mark.parametrize(("offset", "sign"), [("+1h", -1), ("-1h", 1)])
def test_a_worker_an_hour_off_fires_on_the_database_clock(
    skewed, database_url, offset: str, sign: int
) -> None:
    daemon = skewed(offset)
    _fired(database_url, 3)
    said = daemon.wait_for("clock_skew")
    assert abs(said["offset_ms"] - sign * 3_600_000) < 5_000
    _fires_keep_to_the_database_clock(database_url)
    assert daemon.stop() == 0
    assert_invariants(database_url, pending_ok=True)


def test_a_worker_ahead_does_not_hold_back_the_fires_of_another(skewed, database_url) -> None:
    ahead = skewed("+1h")
    _fired(database_url, 2)
    assert ahead.stop() == 0
    # The honest worker goes on firing at once: no last_fire_at was left an
    # hour in the future for it to wait out.
    honest = skewed(None)
    [(before,)] = query(database_url, "SELECT count(*) FROM syncworker.runs WHERE source = 'cron'")
    _fired(database_url, before + 3)
    _fires_keep_to_the_database_clock(database_url)
    assert not honest.events("clock_skew")
    assert honest.stop() == 0
    assert_invariants(database_url, pending_ok=True)
