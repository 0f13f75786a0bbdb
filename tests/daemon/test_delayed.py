"""Delayed and debounced triggers (issue 16; SPEC "Operating it"), with real
daemons: a run starts no sooner than its not_before and within a second
after it, woken by the scheduler, not by a poll; a joined trigger moves the
start later; a storm of 50 webhooks with `debounce` gives one run across two
instances; a worker whose clock runs ahead does not start one early; a
delayed run waits across a restart; SQL, NOTIFY, the CLI and Python; bad
delays refused with nothing written."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from syncworker import TriggerError, trigger_sync_blocking
from tests.daemon.test_clock_skew import LIBFAKETIME
from tests.harness import cli, execute, query, wait_until, write_config
from tests.invariants import assert_invariants

JOBS = """
[jobs.solo]
steps = ["sw_testjobs:record"]

[jobs.hook]
debounce = 2
steps = ["sw_testjobs:record"]

[jobs.pfa]
scopes = ["A", "B"]
steps = ["sw_testjobs:record"]
"""

# heartbeat_interval 10: the heartbeat's safety-net look for pending runs
# comes every 2.5 s, so a start within a second of not_before is the
# scheduler waking at it.
QUIET = {"heartbeat_interval": 10}


def delayed(url: str, job: str, seconds: float, scope: str | None = None) -> tuple[int, datetime]:
    """trigger() with run_after: the run's id and its not_before."""
    [(run_id, _)] = query(
        url,
        "SELECT * FROM syncworker.trigger(%s, %s, run_after => make_interval(secs => %s))",
        (job, scope, seconds),
    )
    [(not_before,)] = query(url, "SELECT not_before FROM syncworker.runs WHERE id = %s", (run_id,))
    return int(run_id), not_before


def started_at(url: str, run_id: int) -> datetime:
    """When the step's first line ran (test_log), by the database's clock."""
    [(at,)] = query(url, "SELECT min(at) FROM test_log WHERE run_id = %s", (run_id,))
    assert at is not None, f"run {run_id} never ran its step"
    return at  # type: ignore[no-any-return]


def ran(url: str, run_id: int) -> bool:
    return bool(query(url, "SELECT count(*) FROM test_log WHERE run_id = %s", (run_id,))[0][0])


def test_a_delayed_run_starts_at_not_before_and_not_sooner(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS, **QUIET))
    run_id, not_before = delayed(database_url, "solo", 2)
    [(status, reserved)] = query(
        database_url, "SELECT status, reserved_for FROM syncworker.runs WHERE id = %s", (run_id,)
    )
    assert (status, reserved) == ("pending", None)  # a delayed run is reserved for no one
    shown = cli("status", "--config", str(daemon.config)).stdout
    assert "pending, starts in" in shown, shown
    daemon.wait_for("run_succeeded", run_id=run_id, timeout=10)
    late = (started_at(database_url, run_id) - not_before).total_seconds()
    assert 0 <= late < 1.0, late
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_a_joined_trigger_moves_the_start_to_the_later_time(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS, **QUIET))
    first, early = delayed(database_url, "solo", 1)
    joined, later = delayed(database_url, "solo", 3)
    assert joined == first and later > early + timedelta(seconds=1.5)
    # A trigger without a delay joins too, and leaves the later start.
    again, kept = delayed(database_url, "solo", 0)
    assert (again, kept) == (first, later)
    [(triggers,)] = query(
        database_url, "SELECT triggers FROM syncworker.runs WHERE id = %s", (first,)
    )
    assert triggers == 3
    daemon.wait_for("run_succeeded", run_id=first, timeout=10)
    assert started_at(database_url, first) >= later
    assert daemon.stop() == 0


def test_a_delay_joining_a_reserved_run_takes_the_reservation_back(database_url, tmp_path, start):
    # No worker runs: the run is pending, reserved for no one; a fake live
    # reservation is made by hand, then a delayed trigger joins it.
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0
    [(run_id, _)] = query(database_url, "SELECT * FROM syncworker.trigger('solo')")
    execute(
        database_url, "UPDATE syncworker.runs SET reserved_for = 'w-gone' WHERE id = %s", (run_id,)
    )
    delayed(database_url, "solo", 30)
    assert query(
        database_url, "SELECT reserved_for FROM syncworker.runs WHERE id = %s", (run_id,)
    ) == [(None,)]


def test_a_storm_of_50_webhooks_with_debounce_gives_one_run(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, JOBS, concurrency=2, **QUIET)
    workers = [start(config), start(config)]
    with psycopg.connect(database_url, autocommit=True) as conn:
        for n in range(50):
            payload = json.dumps({"job": "hook", "order": n})
            conn.execute("SELECT pg_notify('sync_trigger', %s)", (payload,))
            time.sleep(0.02)
        [(last_sent,)] = conn.execute("SELECT clock_timestamp()").fetchall()
    wait_until(
        lambda: query(database_url, "SELECT count(*) FROM test_log WHERE job = 'hook'")[0][0] >= 1,
        timeout=15,
        what="the debounced run",
    )
    time.sleep(1.0)  # time for a second run to show, were there one
    runs = query(
        database_url, "SELECT id, triggers, status FROM syncworker.runs WHERE job = 'hook'"
    )
    assert len(runs) == 1, runs
    [(run_id, _, _)] = runs
    wait_until(
        lambda: (
            query(database_url, "SELECT status FROM syncworker.runs WHERE id = %s", (run_id,))
            == [("succeeded",)]
        ),
        what="the debounced run's end",
    )
    # Every webhook joined the one run (each worker enqueues what it hears,
    # so the count is per worker that heard it), which began the debounce
    # after the last of them.
    [(triggers,)] = query(
        database_url, "SELECT triggers FROM syncworker.runs WHERE id = %s", (run_id,)
    )
    assert 50 <= triggers <= 100, triggers
    waited = (started_at(database_url, run_id) - last_sent).total_seconds()
    assert 1.8 <= waited < 3.0, waited
    assert sum(len(w.events("run_started", job="hook")) for w in workers) == 1
    for w in workers:
        assert w.stop() == 0
    assert_invariants(database_url)


def test_a_worker_whose_clock_runs_ahead_does_not_start_a_delayed_run_early(
    database_url, tmp_path, start
):
    if not LIBFAKETIME.exists():
        pytest.fail(f"{LIBFAKETIME} is missing: `apt-get install faketime` (make test does)")
    config = write_config(tmp_path / "c.toml", database_url, JOBS, **QUIET)
    ahead = start(config, env={"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": "+1h"})
    run_id, not_before = delayed(database_url, "solo", 3)
    ahead.wait_for("run_succeeded", run_id=run_id, timeout=15)
    late = (started_at(database_url, run_id) - not_before).total_seconds()
    assert 0 <= late < 1.0, late
    assert ahead.stop() == 0


def test_a_delayed_run_waits_across_a_restart(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, JOBS, **QUIET)
    first = start(config)
    run_id, not_before = delayed(database_url, "solo", 4)
    first.kill()  # kill -9: the worker that heard of it is gone
    second = start(config)
    second.wait_for("run_succeeded", run_id=run_id, timeout=15)
    late = (started_at(database_url, run_id) - not_before).total_seconds()
    assert 0 <= late < 1.0, late
    assert second.stop() == 0
    assert_invariants(database_url)


def test_run_after_from_notify_the_cli_and_python(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS, **QUIET))
    config = str(daemon.config)

    # NOTIFY: seconds as a number, not part of the payload the step sees.
    execute(
        database_url,
        """NOTIFY sync_trigger, '{"job": "pfa", "scope": "A", "run_after": 1.5, "k": 1}'""",
    )
    said = daemon.wait_for("trigger_enqueued", timeout=5)
    [notified] = [r["run_id"] for r in said["runs"]]
    [(payload, wait)] = query(
        database_url,
        "SELECT payload, extract(epoch FROM not_before - requested_at)"
        " FROM syncworker.runs WHERE id = %s",
        (notified,),
    )
    assert payload == {"k": 1} and 1.4 < float(wait) < 1.6

    # The CLI: --after DURATION.
    done = cli("trigger", "pfa", "--scope", "B", "--after", "2s", "--json", "--config", config)
    assert done.returncode == 0, done.stderr
    [from_cli] = json.loads(done.stdout)["runs"]

    # Python: run_after in seconds or as a timedelta.
    with psycopg.connect(database_url, autocommit=True) as conn:
        [from_python] = trigger_sync_blocking(conn, "solo", run_after=timedelta(seconds=2))
    for run_id in (notified, from_cli, from_python):
        daemon.wait_for("run_succeeded", run_id=run_id, timeout=10)
        [(nb,)] = query(
            database_url, "SELECT not_before FROM syncworker.runs WHERE id = %s", (run_id,)
        )
        assert nb is not None and started_at(database_url, run_id) >= nb
    assert daemon.stop() == 0


def test_bad_delays_are_refused_and_change_nothing(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS, **QUIET))
    config = str(daemon.config)
    with psycopg.connect(database_url, autocommit=True) as conn:
        with pytest.raises(
            psycopg.errors.InvalidParameterValue, match="run_after must not be negative"
        ):
            conn.execute("SELECT syncworker.trigger('solo', run_after => interval '-5 seconds')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="at most 3650 days"):
            # now() + it would be a time no worker could read back
            conn.execute("SELECT syncworker.trigger('solo', run_after => interval '10000 years')")
        with pytest.raises(TriggerError, match="run_after must be a number of seconds from 0"):
            trigger_sync_blocking(conn, "solo", run_after=-1)
    for bad in ("-5s", "soon", "0"):
        refused = cli("trigger", "solo", "--after", bad, "--config", config)
        assert refused.returncode == 2, (bad, refused.stdout, refused.stderr)
        assert "--after" in refused.stderr and "Traceback" not in refused.stderr
    for n, bad in enumerate(("-1", '"30"', "true", "1e12"), start=1):
        notify = f'{{"job": "solo", "run_after": {bad}}}'
        execute(database_url, "SELECT pg_notify('sync_trigger', %s)", (notify,))
        said = daemon.wait_for("trigger_rejected", timeout=5, count=n)
        assert "run_after" in said["reason"], said
    assert query(database_url, "SELECT count(*) FROM syncworker.runs") == [(0,)]
    assert daemon.stop() == 0


def test_debounce_in_the_config_is_checked(tmp_path, database_url):
    config = write_config(
        tmp_path / "c.toml", database_url, JOBS.replace("debounce = 2", "debounce = -1")
    )
    refused = cli("check", "--config", str(config))
    assert refused.returncode != 0
    assert "debounce" in refused.stderr + refused.stdout and "Traceback" not in refused.stderr


def test_the_README_names_the_new_grant(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "syncworker.trigger(text, text, text, text, jsonb, timestamptz, interval)" in readme
    assert "trigger(text, text, text, text, jsonb, timestamptz) TO" not in readme


def test_a_cron_fire_joining_a_delayed_run_waits_for_no_delay(database_url, tmp_path):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0
    run_id, _ = delayed(database_url, "hook", 3600)
    [(joined, created)] = query(
        database_url,
        "SELECT * FROM syncworker.trigger('hook', source => 'cron', scheduled_for => now())",
    )
    assert (joined, created) == (run_id, False)
    assert query(
        database_url, "SELECT not_before FROM syncworker.runs WHERE id = %s", (run_id,)
    ) == [(None,)]


def test_a_delay_that_ends_before_its_commit_starts_at_the_commit(database_url, tmp_path, start):
    """The {"delayed"} wake comes at commit, when this not_before has passed
    already: the read of the next start does not see it, the claim after it
    does (not the heartbeat's safety net, 10 s away here)."""
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS, heartbeat_interval=40))
    with psycopg.connect(database_url) as conn:
        [(run_id, _)] = conn.execute(
            "SELECT * FROM syncworker.trigger('solo', run_after => interval '1 second')"
        ).fetchall()
        time.sleep(1.5)
        conn.commit()
        [(committed,)] = conn.execute("SELECT clock_timestamp()").fetchall()
    daemon.wait_for("run_succeeded", run_id=run_id, timeout=15)
    late = (started_at(database_url, run_id) - committed).total_seconds()
    assert late < 1.0, late
    assert daemon.stop() == 0
