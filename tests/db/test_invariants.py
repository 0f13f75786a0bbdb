"""The invariant checker catches what it is meant to catch: planted
violations in real tables make it fail with the guarantee's name."""

from __future__ import annotations

import pytest

from tests.harness import cli, execute, write_config
from tests.invariants import assert_invariants

JOBS = """
[jobs.span]
scopes = ["a"]
steps = ["sw_testjobs:span"]
"""

RUN = (
    "INSERT INTO syncworker.runs (job, scope, status, source, started_at, finished_at)"
    " VALUES ('span', 'a', %s, 'test', now() - %s::interval, now() - %s::interval)"
    " RETURNING id"
)


@pytest.fixture
def schema(database_url, tmp_path):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0
    return database_url


def test_clean_history_passes(schema):
    execute(schema, RUN, ("succeeded", "10 s", "9 s"))
    execute(schema, RUN, ("succeeded", "8 s", "7 s"))
    assert_invariants(schema)


def test_overlapping_runs_of_a_key_fail(schema):
    execute(schema, RUN, ("succeeded", "10 s", "5 s"))
    execute(schema, RUN, ("failed", "8 s", "7 s"))
    with pytest.raises(AssertionError, match="overlapped"):
        assert_invariants(schema)


def test_a_run_left_running_fails(schema):
    execute(schema, RUN.replace("now() - %s::interval)", "NULL)"), ("running", "1 s"))
    with pytest.raises(AssertionError, match="left"):
        assert_invariants(schema)


def test_overlapping_step_executions_fail(schema):
    execute(
        schema,
        "INSERT INTO test_log (run_id, attempt, job, scope, step, at) VALUES"
        " (1, 1, 'span', 'a', 'span_start', now() - interval '10 s'),"
        " (1, 1, 'span', 'a', 'span_end', now() - interval '5 s'),"
        " (2, 1, 'span', 'a', 'span_start', now() - interval '8 s'),"
        " (2, 1, 'span', 'a', 'span_end', now() - interval '7 s')",
    )
    with pytest.raises(AssertionError, match="same time"):
        assert_invariants(schema)


def test_a_trigger_without_a_run_after_it_fails(schema):
    execute(schema, RUN, ("succeeded", "10 s", "9 s"))
    with pytest.raises(AssertionError, match="lost"):
        # A later trigger's run id that never ran.
        assert_invariants(schema, last_trigger={("span", "a"): 10**9})
