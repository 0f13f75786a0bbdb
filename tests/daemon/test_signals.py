"""SIGTERM/SIGINT drain (guarantee 6), the second signal, and reconnection
after the server restarts (guarantee 8), with real processes."""

from __future__ import annotations

import signal
import time

import pytest

from syncworker.embedded import EmbeddedPostgres
from tests.harness import Daemon, execute, query, release, wait_until, write_config

BLOCK = """
[jobs.block]
scopes = ["x"]
steps = ["sw_testjobs:wait_release", "sw_testjobs:second"]

[jobs.stuck]
steps = ["sw_testjobs:stuck"]

[jobs.solo]
steps = ["sw_testjobs:record"]
"""


def status_of(url: str, run_id: int) -> str:
    return query(url, "SELECT status FROM syncworker.runs WHERE id = %s", (run_id,))[0][0]


def running_run(url: str, job: str) -> int:
    [(run_id,)] = wait_until(
        lambda: query(
            url, "SELECT id FROM syncworker.runs WHERE status = 'running' AND job = %s", (job,)
        ),
        what=f"a running {job} run",
    )
    return run_id


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_drain_lets_the_run_in_flight_finish(database_url, tmp_path, start, sig):
    daemon = start(write_config(tmp_path / "c.toml", database_url, BLOCK))
    execute(database_url, "NOTIFY sync_trigger, 'block'")
    run_id = running_run(database_url, "block")
    daemon.signal(sig)
    daemon.wait_for("drain_started")
    # Work arriving during the drain is stored for later, not started.
    [(later,)] = query(database_url, "SELECT run_id FROM syncworker.trigger('solo')")
    assert daemon.proc.poll() is None
    release(database_url)
    assert daemon.wait_exit() == 0
    # The run went on through its second step after the drain began.
    assert status_of(database_url, run_id) == "succeeded"
    steps = query(
        database_url, "SELECT name, status FROM syncworker.run_steps WHERE run_id = %s", (run_id,)
    )
    assert steps == [("sw_testjobs:wait_release", "succeeded"), ("sw_testjobs:second", "succeeded")]
    assert status_of(database_url, later) == "pending"
    [(state,)] = query(database_url, "SELECT state FROM syncworker.workers")
    assert state == "stopped"
    daemon.wait_for("worker_stopped")


def test_a_step_that_stops_early_on_drain_has_its_run_requeued(database_url, tmp_path, start):
    jobs = (
        BLOCK
        + """
[jobs.coop]
steps = ["sw_testjobs:cooperative", "sw_testjobs:second"]
"""
    )
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs))
    execute(database_url, "NOTIFY sync_trigger, 'coop'")
    run_id = running_run(database_url, "coop")
    wait_until(lambda: query(database_url, "SELECT 1 FROM test_log WHERE step = 'cooperative'"))
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert status_of(database_url, run_id) == "pending"
    logged = query(
        database_url, "SELECT step FROM test_log WHERE run_id = %s ORDER BY id", (run_id,)
    )
    assert logged == [("cooperative",), ("stopped early",)]  # 'second' never ran
    daemon.wait_for("run_cancelled", run_id=run_id, reason="interrupted by shutdown")


def test_drain_timeout_cancels_and_requeues_then_a_new_worker_finishes(
    database_url, tmp_path, start
):
    config = write_config(tmp_path / "c.toml", database_url, BLOCK, drain_timeout=1)
    daemon = start(config)
    execute(database_url, "NOTIFY sync_trigger, 'block'")
    run_id = running_run(database_url, "block")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=20) == 0
    daemon.wait_for("drain_cancelling")
    daemon.wait_for("run_cancelled", run_id=run_id, status="pending")
    row = query(
        database_url,
        "SELECT status, attempt, worker_id FROM syncworker.runs WHERE id = %s",
        (run_id,),
    )
    assert row == [("pending", 1, None)]
    steps = query(
        database_url, "SELECT status FROM syncworker.run_steps WHERE run_id = %s", (run_id,)
    )
    assert steps == [("cancelled",)]

    release(database_url)
    start(config)
    wait_until(lambda: status_of(database_url, run_id) == "succeeded", what="requeued run done")


def test_step_that_ignores_cancellation_does_not_hold_the_exit(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, BLOCK, drain_timeout=0.5))
    execute(database_url, "NOTIFY sync_trigger, 'stuck'")
    run_id = running_run(database_url, "stuck")
    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=20) == 0
    assert time.monotonic() - began < 15  # the thread sleeps 600 s
    assert status_of(database_url, run_id) == "pending"


def test_second_signal_cancels_at_once(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, BLOCK, drain_timeout=600))
    execute(database_url, "NOTIFY sync_trigger, 'block'")
    run_id = running_run(database_url, "block")
    daemon.signal(signal.SIGTERM)
    daemon.wait_for("drain_started")
    daemon.signal(signal.SIGINT)
    assert daemon.wait_exit(timeout=20) == 0
    daemon.wait_for("drain_forced")
    assert status_of(database_url, run_id) == "pending"
    assert query(database_url, "SELECT count(*) FROM syncworker.runs WHERE status = 'running'") == [
        (0,)
    ]


def test_reconnects_after_the_server_restarts(tmp_path, daemons):
    with EmbeddedPostgres() as server:
        url = server.url
        from tests.jobs.sw_testjobs import SETUP_SQL

        execute(url, SETUP_SQL)
        daemon = Daemon(write_config(tmp_path / "c.toml", url, BLOCK))
        daemons.append(daemon)
        daemon.ready()

        server.stop()
        daemon.wait_for("db_disconnected")
        server.start()
        daemon.wait_for("db_reconnected")

        # A NOTIFY after the reconnect is heard, and the run recorded.
        execute(url, "NOTIFY sync_trigger, 'solo'")
        wait_until(
            lambda: (
                query(url, "SELECT status FROM syncworker.runs WHERE job = 'solo'")
                == [("succeeded",)]
            ),
            what="run after reconnect",
        )
        assert daemon.proc.poll() is None

        # A durable trigger stored while the worker is deaf (server restarting
        # under it) is found in the table after it listens again.
        server.stop()
        daemon.wait_for("db_disconnected", count=2)
        server.start()
        execute(url, "SELECT * FROM syncworker.trigger('solo')")
        wait_until(
            lambda: (
                query(url, "SELECT count(*) FROM syncworker.runs WHERE status = 'succeeded'")
                == [(2,)]
            ),
            what="durable trigger served after reconnect",
        )
        assert daemon.stop() == 0


def test_a_command_step_stopped_by_the_drain_requeues_its_run(database_url, tmp_path, start):
    jobs = """
[jobs.cmd]
steps = [{ command = ["sleep", "30"] }]
"""
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs))
    execute(database_url, "NOTIFY sync_trigger, 'cmd'")
    run_id = running_run(database_url, "cmd")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=20) == 0
    assert status_of(database_url, run_id) == "pending"
    steps = query(
        database_url, "SELECT status, error FROM syncworker.run_steps WHERE run_id = %s", (run_id,)
    )
    assert steps == [("cancelled", "stopped by shutdown")]


def test_a_busy_worker_keeps_beating_and_keeps_its_runs(database_url, tmp_path, start):
    """State changes on every run must not postpone the heartbeat: a worker
    whose heartbeat goes stale loses its live runs to orphan recovery."""
    jobs = """
[jobs.quick]
scopes = ["a", "b", "c"]
steps = ["sw_testjobs:plain"]
"""
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs, concurrency=2))
    worst = 0.0
    deadline = time.monotonic() + 4  # four heartbeat intervals of constant churn
    while time.monotonic() < deadline:
        execute(database_url, "SELECT * FROM syncworker.trigger('quick')")
        [(age,)] = query(
            database_url, "SELECT extract(epoch FROM now() - heartbeat_at) FROM syncworker.workers"
        )
        worst = max(worst, float(age))
    assert worst < 2.5, f"heartbeat went {worst:.1f} s stale with heartbeat_interval = 1"
    assert daemon.events("run_lost") == [] and daemon.events("run_recovered") == []
