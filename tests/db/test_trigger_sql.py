"""trigger() and trigger_and_claim() as the database runs them (sql/006): the
run written once, reserved or claimed in its insert; every case the shortcut
does not cover left to trigger(); the key's lock that keeps a reservation from
being made while another run of the key starts; no shortcut where a statement
reads an older snapshot than the lock."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from syncworker.db import lock_namespace
from tests.harness import cli, query, wait_until, write_config

JOBS = """
[jobs.solo]
steps = ["sw_testjobs:record"]

[jobs.pfa]
steps = ["sw_testjobs:record"]
scopes = ["RIO", "HOU"]

[jobs.off]
steps = ["sw_testjobs:record"]
enabled = false
"""

CLAIM = (
    "SELECT run_id, created, step_id, max_attempts FROM syncworker.trigger_and_claim("
    "'me', 'first', 'sync_events', %s, %s, 'notify', NULL, %s::jsonb)"
)


@pytest.fixture
def url(database_url: str, tmp_path: Any) -> str:
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0  # and registers the jobs
    return database_url


@pytest.fixture
def live_worker(url: str) -> Iterator[str]:
    """A worker row trigger() may reserve for, alive as a worker is: its
    session holds the liveness lock, and it claims reservations from the row
    (sql/007)."""
    [(lock_key,)] = query(
        url,
        "INSERT INTO syncworker.workers (id, hostname, pid, version, state, concurrency,"
        " first_steps, reserve_by_id)"
        " VALUES ('w', 'h', 1, 'v', 'idle', 1, '{\"solo\": \"s\", \"pfa\": \"s\"}', true)"
        " RETURNING lock_key",
    )
    with psycopg.connect(url, autocommit=True) as session:
        session.execute("SELECT pg_advisory_lock(%s, %s)", (lock_namespace("syncworker"), lock_key))
        yield "w"


def _writes(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """Rows this transaction inserted into and updated in runs so far."""
    [row] = conn.execute(
        "SELECT pg_stat_get_xact_tuples_inserted('syncworker.runs'::regclass),"
        " pg_stat_get_xact_tuples_updated('syncworker.runs'::regclass)"
    ).fetchall()
    return row


def _run(url: str, run_id: int) -> tuple[Any, ...]:
    [row] = query(
        url,
        "SELECT status, worker_id, attempt, current_step, reserved_for, triggers"
        " FROM syncworker.runs WHERE id = %s",
        (run_id,),
    )
    return row


def test_a_notify_trigger_is_inserted_running_for_the_worker(url: str) -> None:
    with psycopg.connect(url) as conn:  # a transaction, for its write counts
        [(run_id, created, step_id, max_attempts)] = conn.execute(
            CLAIM, ("solo", None, "{}")
        ).fetchall()
        assert _writes(conn) == (1, 0)
    assert created and step_id is not None and max_attempts == 1
    assert _run(url, run_id) == ("running", "me", 1, "first", None, 1)
    steps = query(
        url,
        "SELECT id, attempt, position, name, status FROM syncworker.run_steps WHERE run_id = %s",
        (run_id,),
    )
    assert steps == [(step_id, 1, 0, "first", "running")]


def test_trigger_writes_the_reservation_with_the_run(url: str, live_worker: str) -> None:
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute("LISTEN syncworker_wake")
        with psycopg.connect(url) as conn:
            [(run_id, created)] = conn.execute(
                "SELECT * FROM syncworker.trigger('solo', source => 'test', triggered_by => 'tester')"
            ).fetchall()
            assert _writes(conn) == (1, 0)
        heard = next(listener.notifies(timeout=10.0, stop_after=1))
    assert created and _run(url, run_id) == ("pending", None, 0, None, live_worker, 1)
    # Any role may LISTEN: whom it is for and which run, nothing else (sql/007).
    assert json.loads(heard.payload) == {"reserved_for": live_worker, "id": run_id}


def test_no_reservation_for_a_worker_that_reads_the_run_off_the_wake(
    url: str, live_worker: str
) -> None:
    """A worker of a version before 7 needs the run's fields in the wake, which
    no longer carries them: it is not reserved for, and claims as any worker."""
    query(url, "UPDATE syncworker.workers SET reserve_by_id = false WHERE id = %s", (live_worker,))
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute("LISTEN syncworker_wake")
        [(run_id, created)] = query(url, "SELECT * FROM syncworker.trigger('solo')")
        heard = next(listener.notifies(timeout=10.0, stop_after=1))
    assert created and _run(url, run_id) == ("pending", None, 0, None, None, 1)
    assert heard.payload == "solo"


def test_a_running_key_gets_a_pending_run_after_it(url: str) -> None:
    [(running,)] = query(
        url,
        "INSERT INTO syncworker.runs (job, status, source, worker_id, attempt)"
        " VALUES ('solo', 'running', 'test', 'peer', 1) RETURNING id",
    )
    [(run_id, created, step_id, _)] = query(url, CLAIM, ("solo", None, "{}"))
    assert run_id != running and created and step_id is None
    assert _run(url, run_id)[:2] == ("pending", None)


def test_a_pending_run_of_the_key_is_joined(url: str) -> None:
    [(pending,)] = query(
        url,
        "INSERT INTO syncworker.runs (job, scope, status, source)"
        " VALUES ('pfa', 'RIO', 'pending', 'test') RETURNING id",
    )
    assert query(url, CLAIM, ("pfa", "RIO", "{}")) == [(pending, False, None, None)]
    assert _run(url, pending)[0::5] == ("pending", 2)


def test_every_scope_of_a_job_is_trigger_s_to_enqueue(url: str) -> None:
    made = query(url, CLAIM, ("pfa", None, "{}"))
    assert [(created, step_id) for _, created, step_id, _ in made] == [(True, None)] * 2
    assert query(url, "SELECT scope, status FROM syncworker.runs ORDER BY scope") == [
        ("HOU", "pending"),
        ("RIO", "pending"),
    ]


@pytest.mark.parametrize(
    ("job", "scope", "payload", "says"),
    [
        ("nope", None, "{}", "unknown job 'nope'"),
        ("off", None, "{}", "job 'off' is disabled"),
        ("pfa", "XXX", "{}", "unknown scope 'XXX'"),
        ("solo", "RIO", "{}", "has no scopes"),
        ("solo", None, "[1]", "payload must be a JSON object"),
    ],
)
def test_bad_input_gets_trigger_s_error_and_writes_nothing(
    url: str, job: str, scope: str | None, payload: str, says: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=says):
        query(url, CLAIM, (job, scope, payload))
    assert query(url, "SELECT count(*) FROM syncworker.runs") == [(0,)]


def test_a_trigger_deciding_on_the_key_holds_the_notify_path_until_it_commits(
    url: str,
) -> None:
    """Without the key's lock the NOTIFY path would not see the trigger's
    uncommitted run, and would start a run of the key beside it."""
    outcome: list[Any] = []
    with psycopg.connect(url) as first:
        [(run_id, created)] = first.execute("SELECT * FROM syncworker.trigger('solo')").fetchall()
        assert created

        def notify_path() -> None:
            try:
                outcome.extend(query(url, CLAIM, ("solo", None, "{}")))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=notify_path)
        thread.start()
        wait_until(
            lambda: (
                query(
                    url,
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                )
                == [(1,)]
            ),
            what="the NOTIFY path waiting on the key's lock",
        )
        assert outcome == []
        first.commit()
    thread.join(10)
    assert outcome == [(run_id, False, None, None)]
    assert query(url, "SELECT count(*) FROM syncworker.runs") == [(1,)]


def test_under_repeatable_read_neither_reserves_nor_claims(url: str, live_worker: str) -> None:
    """Such a statement reads the transaction's first snapshot, older than
    the key's lock: the run is left pending for a claim."""
    with psycopg.connect(url) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        [(claimed_id, created, step_id, _)] = conn.execute(CLAIM, ("solo", None, "{}")).fetchall()
        assert created and step_id is None
        [(other_id, created)] = conn.execute(
            "SELECT * FROM syncworker.trigger('pfa', 'RIO')"
        ).fetchall()
        assert created
    assert _run(url, claimed_id)[0::4] == ("pending", None)
    assert _run(url, other_id)[0::4] == ("pending", None)
