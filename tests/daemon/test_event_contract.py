"""The wire formats in syncworker/events.py against what the SQL side
really publishes: a live worker's run events (started, progress,
succeeded, failed) and trigger()'s reservation wake, read off the channels
by a listener of the test's own and parsed with events.py."""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg

from syncworker.events import RUN_EVENTS, parse_run_event, reserved_run_id
from tests.harness import query, wait_until, write_config
from tests.invariants import trigger

JOBS = """
[jobs.progress]
steps = ["sw_testjobs:progress"]

[jobs.solo]
steps = ["sw_testjobs:record"]
"""


def _drain(conn: psycopg.Connection[Any], until: float) -> list[psycopg.Notify]:
    got: list[psycopg.Notify] = []
    while time.monotonic() < until:
        got += list(conn.notifies(timeout=0.1, stop_after=1))
    return got


def test_run_events_parse_as_events_py_says(database_url, tmp_path, start):
    start(write_config(tmp_path / "c.toml", database_url, JOBS))
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN sync_events")
        ok = trigger(database_url, "progress", None, chunks=2, size=5, pause=1.1)
        bad = trigger(database_url, "solo", None, fail_times=5)
        wait_until(
            lambda: (
                query(
                    database_url,
                    "SELECT count(*) FROM syncworker.runs WHERE status IN ('succeeded', 'failed')",
                )
                == [(2,)]
            ),
            timeout=20,
            what="both runs ended",
        )
        notes = _drain(listener, time.monotonic() + 0.5)
    events = [parse_run_event(n.payload) for n in notes]
    assert None not in events, [n.payload for n in notes]
    by_run: dict[int, list[str]] = {}
    for e in events:
        assert e is not None and e.event in RUN_EVENTS
        by_run.setdefault(e.run_id, []).append(e.event)
        [(job, _status)] = query(
            database_url, "SELECT job, status FROM syncworker.runs WHERE id = %s", (e.run_id,)
        )
        assert e.job == job
    assert by_run[ok][0] == "run_started" and by_run[ok][-1] == "run_succeeded"
    assert "run_progress" in by_run[ok]
    progress = [e for e in events if e is not None and e.event == "run_progress"]
    assert all(e.records_total == 10 and e.step for e in progress)
    assert by_run[bad][0] == "run_started" and by_run[bad][-1] == "run_failed"


def test_a_reservation_wake_parses_as_events_py_says(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    [(worker_id,)] = query(
        database_url, "SELECT id FROM syncworker.workers WHERE pid = %s", (daemon.proc.pid,)
    )
    wait_until(
        lambda: query(database_url, "SELECT state FROM syncworker.workers") == [("idle",)],
        what="the worker idle",
    )
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN syncworker_wake")
        run_id = trigger(database_url, "solo")
        notes = _drain(listener, time.monotonic() + 0.5)
    reservations = [n.payload for n in notes if n.payload.startswith("{")]
    assert reservations, [n.payload for n in notes]
    assert [reserved_run_id(p, worker_id) for p in reservations] == [run_id]
    assert set(json.loads(reservations[0])) == {"reserved_for", "id"}  # nothing more
    assert reserved_run_id(reservations[0], "someone-else") is None
