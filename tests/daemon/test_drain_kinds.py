"""The drain rule for every step kind: a step that starts after the drain
began, and does not look at `stopping`, runs to its end, and its run is
recorded as it ended (not put back to pending to run its first steps again).
Each step records its own start and end in test_log."""

from __future__ import annotations

import signal
from datetime import datetime

import pytest

from tests.harness import query, release, write_config

RECORD = "INSERT INTO test_log (run_id, step) VALUES (%(run_id)s, '{}')"
SECOND_STEP = {
    "async": '"sw_testjobs:span"',
    "plain": '"sw_drainjobs:plain_span"',
    "sql": '{ sql = "'
    + RECORD.format("span_start")
    + "; SELECT pg_sleep(0.5); "
    + RECORD.format("span_end")
    + '" }',
    "command": '{ command = ["sh", "-c", "psql -Xq \\"$SW_TEST_DATABASE_URL\\" -c \\"INSERT INTO test_log'
    ' (run_id, step) VALUES ({run_id}, \'span_start\')\\"; sleep 0.5; psql -Xq \\"$SW_TEST_DATABASE_URL\\"'
    ' -c \\"INSERT INTO test_log (run_id, step) VALUES ({run_id}, \'span_end\')\\""] }',
}


@pytest.mark.parametrize("kind", sorted(SECOND_STEP))
def test_a_step_that_starts_during_the_drain_runs_to_its_end(
    kind: str, database_url: str, tmp_path, start
) -> None:
    jobs = f'[jobs.two]\nsteps = ["sw_testjobs:wait_release", {SECOND_STEP[kind]}]\n'
    config = write_config(tmp_path / "c.toml", database_url, jobs, drain_timeout=60)
    daemon = start(config, env={"SW_TEST_DATABASE_URL": database_url})
    [(run_id,)] = query(database_url, "SELECT run_id FROM syncworker.trigger('two')")
    daemon.wait_for("step_started", run_id=run_id, step="sw_testjobs:wait_release")

    daemon.signal(signal.SIGTERM)
    drained = daemon.wait_for("drain_started")
    release(database_url)  # the first step ends; the second starts in the drain
    assert daemon.wait_exit(timeout=60) == 0

    spans = dict(
        query(
            database_url,
            "SELECT step, at FROM test_log WHERE run_id = %s AND step LIKE 'span_%%'",
            (run_id,),
        )
    )
    assert set(spans) == {"span_start", "span_end"}, spans
    drain_at = datetime.fromisoformat(drained["timestamp"].replace("Z", "+00:00"))
    assert drain_at < spans["span_start"] < spans["span_end"]
    assert query(database_url, "SELECT status FROM syncworker.runs WHERE id = %s", (run_id,)) == [
        ("succeeded",)
    ]
    assert query(
        database_url,
        "SELECT status FROM syncworker.run_steps WHERE run_id = %s ORDER BY position",
        (run_id,),
    ) == [("succeeded",), ("succeeded",)]
