"""The listening session never waits on a lock an app holds (issue 13).

Every NOTIFY reaches the worker through one session, and the worker reads
the next only once the previous one is enqueued. An app transaction that
triggered a key and stays open holds that key's lock; a NOTIFY of the same
key must not hold up every other trigger until it commits.
"""

from __future__ import annotations

import psycopg

from tests.harness import execute, query, wait_until, write_config
from tests.invariants import assert_invariants

JOBS = """
[jobs.solo]
steps = ["sw_testjobs:record"]

[jobs.other]
steps = ["sw_testjobs:record"]
"""


def _statuses(url: str, job: str) -> list[str]:
    return [
        row[0] for row in query(url, "SELECT status FROM syncworker.runs WHERE job = %s", (job,))
    ]


def test_an_open_transaction_holding_a_key_does_not_stall_other_triggers(
    database_url, tmp_path, start
):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    with psycopg.connect(database_url) as app:  # a transaction, left open
        app.execute("SELECT * FROM syncworker.trigger('solo')")
        execute(database_url, "NOTIFY sync_trigger, 'solo'")
        daemon.wait_for("trigger_deferred")
        # The listener is free: a trigger of another key runs at once, by
        # NOTIFY and by a durable trigger() alike, while `app` stays open.
        execute(database_url, "NOTIFY sync_trigger, 'other'")
        daemon.wait_for("run_succeeded", job="other", timeout=10)
        execute(database_url, "SELECT * FROM syncworker.trigger('other', source => 'sql')")
        daemon.wait_for("run_succeeded", job="other", count=2, timeout=10)
        assert _statuses(database_url, "solo") == []  # not visible until the commit
        app.commit()
    # The deferred NOTIFY is enqueued once the lock is free, and joins or
    # follows the app's run: every trigger of solo is served.
    wait_until(
        lambda: (
            "succeeded" in _statuses(database_url, "solo")
            and not {"pending", "running"} & set(_statuses(database_url, "solo"))
        ),
        what="solo served after the commit",
    )
    [enqueued] = [
        r for r in daemon.events("trigger_enqueued") if r["runs"] and r["runs"][0]["job"] == "solo"
    ]
    assert enqueued["runs"][0]["run_id"] in {
        row[0] for row in query(database_url, "SELECT id FROM syncworker.runs WHERE job = 'solo'")
    }
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_a_reservation_whose_row_is_locked_is_claimed_off_the_listener(
    database_url, tmp_path, start
):
    """The reserved run's claim runs on the listening session, within the
    same lock budget: a row held by an open transaction sends it to a pooled
    session, where it waits, while the listener goes on."""
    from tests.daemon.test_reserved import _notify_reservation, _pending_run, _worker_id

    # Two slots: the claim waiting for the row holds one.
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS, concurrency=2))
    run_id = _pending_run(database_url, "solo", reserved_for=_worker_id(database_url, daemon))
    with psycopg.connect(database_url) as app:
        app.execute("SELECT 1 FROM syncworker.runs WHERE id = %s FOR UPDATE", (run_id,))
        _notify_reservation(database_url, run_id)
        execute(database_url, "NOTIFY sync_trigger, 'other'")
        daemon.wait_for("run_succeeded", job="other", timeout=10)
        assert _statuses(database_url, "solo") == ["pending"]
        app.commit()
    started = daemon.wait_for("run_started", run_id=run_id, timeout=10)
    assert started["via"] == "reservation"
    daemon.wait_for("run_succeeded", run_id=run_id)
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_a_liveness_lock_held_by_a_stale_session_is_taken_back(database_url, tmp_path, start):
    """After a partition the server may keep the worker's old listening
    session, and its liveness lock, for hours: the reconnect ends that
    session rather than wait for the lock."""
    import threading

    from tests.daemon.test_reserved import _worker_id

    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    worker_id = _worker_id(database_url, daemon)
    [(key,)] = query(
        database_url, "SELECT lock_key FROM syncworker.workers WHERE id = %s", (worker_id,)
    )
    [(holder_pid, ns)] = query(
        database_url,
        "SELECT l.pid, l.classid::bigint FROM pg_locks l WHERE l.locktype = 'advisory'"
        " AND l.granted AND l.objsubid = 2 AND l.objid = %s::bigint::oid"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (key,),
    )
    # A session queued for the same lock stands in for the stale one: it
    # gets the lock the moment the worker's session is cut.
    stale = psycopg.connect(database_url, autocommit=True)
    queued = threading.Thread(
        target=lambda: stale.execute("SELECT pg_advisory_lock(%s::int, %s)", (ns, key)),
        daemon=True,
    )
    queued.start()
    wait_until(
        lambda: (
            query(
                database_url,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND objid = %s::bigint::oid",
                (key,),
            )
            == [(1,)]
        ),
        what="the stand-in queued for the lock",
    )
    execute(database_url, "SELECT pg_terminate_backend(%s)", (holder_pid,))
    daemon.wait_for("db_reconnected", timeout=20)
    queued.join(10)
    # The lock is the worker's new session's; the stand-in was ended.
    holders = query(
        database_url,
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2"
        " AND objid = %s::bigint::oid"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (key,),
    )
    assert len(holders) == 1 and holders[0][0] not in (holder_pid, stale.info.backend_pid)
    stale.close()
    run_id = __import__("tests.invariants", fromlist=["trigger"]).trigger(database_url, "solo")
    daemon.wait_for("run_succeeded", run_id=run_id)
    assert daemon.stop() == 0
    assert_invariants(database_url)
