"""trigger() reserves a new run for an idle worker, which starts it from the
notification (sql/005). Real daemons: the reservation taken and claimed, given
back when the worker cannot take it (busy, draining), never made for a dead
worker, cleared when the worker it names died, and taken up after a
reconnect when the notification was missed."""

from __future__ import annotations

import json
import signal
import time

import psycopg

from tests.harness import Daemon, execute, query, release, wait_until, write_config
from tests.invariants import assert_invariants, trigger

JOBS = """
[jobs.solo]
steps = ["sw_testjobs:record"]

[jobs.other]
steps = ["sw_testjobs:record"]

[jobs.hold]
steps = ["sw_testjobs:wait_release"]
"""


def _worker_id(url: str, daemon: Daemon) -> str:
    [(worker_id,)] = query(
        url,
        "SELECT id FROM syncworker.workers WHERE pid = %s AND state <> 'stopped'",
        (daemon.proc.pid,),
    )
    return str(worker_id)


def _idle(url: str, daemon: Daemon) -> str:
    """Wait until the worker's row says idle (trigger() reserves only for a
    worker whose state is written); returns its id."""
    worker_id = _worker_id(url, daemon)
    wait_until(
        lambda: (
            query(url, "SELECT state FROM syncworker.workers WHERE id = %s", (worker_id,))
            == [("idle",)]
        ),
        what="the worker's state written idle",
    )
    return worker_id


def _status(url: str, run_id: int) -> tuple[str, str | None, str | None]:
    [row] = query(
        url, "SELECT status, reserved_for, worker_id FROM syncworker.runs WHERE id = %s", (run_id,)
    )
    return row


def _pending_run(url: str, job: str, reserved_for: str | None = None) -> int:
    """A pending run inserted directly (so trigger() chooses nothing), reserved
    from the start when asked: no worker may claim it unreserved first."""
    [(run_id,)] = query(
        url,
        "INSERT INTO syncworker.runs (job, status, source, reserved_for)"
        " VALUES (%s, 'pending', 'test', %s) RETURNING id",
        (job, reserved_for),
    )
    return int(run_id)


def _notify_reservation(url: str, run_id: int) -> None:
    """The notification trigger() sends with a reservation (sql/007)."""
    [(payload,)] = query(
        url,
        "SELECT json_build_object('reserved_for', reserved_for, 'id', id)::text"
        " FROM syncworker.runs WHERE id = %s",
        (run_id,),
    )
    execute(url, "SELECT pg_notify('syncworker_wake', %s)", (payload,))


def test_an_idle_worker_starts_its_reserved_run(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    worker_id = _idle(database_url, daemon)
    run_id = trigger(database_url, "solo")
    started = daemon.wait_for("run_started", run_id=run_id)
    assert started["via"] == "reservation"
    wait_until(lambda: _status(database_url, run_id)[0] == "succeeded", what="run succeeded")
    assert _status(database_url, run_id) == ("succeeded", None, worker_id)
    # The claim recorded the first step as claim() does, and the run event.
    steps = query(
        database_url,
        "SELECT attempt, position, status FROM syncworker.run_steps WHERE run_id = %s",
        (run_id,),
    )
    assert steps == [(1, 0, "succeeded")]
    [(attempt,)] = query(
        database_url, "SELECT attempt FROM syncworker.runs WHERE id = %s", (run_id,)
    )
    assert attempt == 1
    assert daemon.stop() == 0
    assert_invariants(database_url, last_trigger={("solo", None): run_id})


def test_a_trigger_while_the_worker_is_busy_is_not_reserved(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    hold = trigger(database_url, "hold")
    daemon.wait_for("run_started", run_id=hold)
    run_id = trigger(database_url, "other")
    assert _status(database_url, run_id)[:2] == ("pending", None)  # its slot is taken
    release(database_url)
    assert daemon.wait_for("run_started", run_id=run_id)["via"] == "claim"
    assert daemon.stop() == 0


def test_a_busy_worker_gives_its_reservation_back(database_url, tmp_path, start):
    """A reservation reaching a worker without a free slot (trigger() saw an
    older state) is released, and the run claimed once the slot frees."""
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    worker_id = _worker_id(database_url, daemon)
    hold = trigger(database_url, "hold")
    daemon.wait_for("run_started", run_id=hold)
    run_id = _pending_run(database_url, "other", reserved_for=worker_id)
    _notify_reservation(database_url, run_id)
    wait_until(
        lambda: _status(database_url, run_id)[:2] == ("pending", None),
        what="the reservation released",
    )
    release(database_url)
    wait_until(lambda: _status(database_url, run_id)[0] == "succeeded", what="run claimed later")
    assert daemon.wait_for("run_started", run_id=run_id)["via"] == "claim"
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_no_reservation_for_a_dead_worker(database_url, tmp_path, start):
    """A worker row that looks idle but whose session (lock) is gone is passed over."""
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    worker_id = _idle(database_url, daemon)
    execute(
        database_url,
        "INSERT INTO syncworker.workers (id, hostname, pid, version, state, concurrency,"
        " first_steps, heartbeat_at) VALUES ('ghost', 'h', 1, 'v', 'idle', 4, %s,"
        " now() + interval '1 hour')",
        (json.dumps({"solo": "sw_testjobs:record"}),),
    )
    run_id = trigger(database_url, "solo")
    started = daemon.wait_for("run_started", run_id=run_id)
    assert started["via"] == "reservation"
    wait_until(lambda: _status(database_url, run_id)[0] == "succeeded", what="run succeeded")
    assert _status(database_url, run_id)[2] == worker_id
    assert daemon.stop() == 0


def test_the_reservation_of_a_dead_worker_is_cleared(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    execute(
        database_url,
        "INSERT INTO syncworker.workers (id, hostname, pid, version, state)"
        " VALUES ('ghost', 'h', 1, 'v', 'idle')",
    )
    run_id = _pending_run(database_url, "solo", reserved_for="ghost")
    # Judged once the server has been up past the grace after an outage
    # (sql/005, README): at most 10 s + 3 heartbeats on a fresh server.
    wait_until(
        lambda: _status(database_url, run_id)[0] == "succeeded",
        timeout=40,
        what="the ghost's reservation cleared and the run claimed",
    )
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_a_reservation_whose_notification_was_missed_is_taken_up_on_reconnect(
    database_url, tmp_path, start
):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    worker_id = _worker_id(database_url, daemon)
    run_id = _pending_run(database_url, "solo", reserved_for=worker_id)
    [(killed,)] = query(
        database_url,
        "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l"
        " JOIN syncworker.workers w ON l.objid = w.lock_key::bigint::oid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND w.id = %s"
        "   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (worker_id,),
    )
    assert killed == 1
    daemon.wait_for("db_reconnected")
    # Its own reservation, read back once listening again, and claimed as one.
    assert daemon.wait_for("run_started", run_id=run_id)["via"] == "reservation"
    wait_until(lambda: _status(database_url, run_id)[0] == "succeeded", what="run claimed")
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_a_draining_worker_gives_its_reservations_back(database_url, tmp_path, start):
    """Stopping with a run in flight: a reservation reaching it then is
    released, and another worker runs it."""
    config = write_config(tmp_path / "c.toml", database_url, JOBS, concurrency=2)
    first = start(config)
    first_id = _worker_id(database_url, first)
    hold = trigger(database_url, "hold")
    first.wait_for("run_started", run_id=hold)
    first.signal(signal.SIGTERM)
    first.wait_for("drain_started")
    run_id = _pending_run(database_url, "solo", reserved_for=first_id)
    _notify_reservation(database_url, run_id)
    wait_until(
        lambda: _status(database_url, run_id)[:2] == ("pending", None),
        what="the reservation released",
    )
    second = start(config)
    wait_until(lambda: _status(database_url, run_id)[0] == "succeeded", what="run served")
    assert _status(database_url, run_id)[2] == _worker_id(database_url, second)
    release(database_url)
    assert first.wait_exit(60) == 0
    assert second.stop() == 0
    assert_invariants(database_url)


def test_a_notify_trigger_is_claimed_by_the_call_that_enqueues_it(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    # A claim of the worker's own in flight (its start-up claim, a heartbeat's
    # safety-net wake) holds its only slot, and the run then goes the
    # reservation's way: a few NOTIFYs, one after another, must see the call
    # claim one.
    for n in range(1, 6):
        execute(database_url, "NOTIFY sync_trigger, 'solo'")
        started = daemon.wait_for("run_succeeded", count=n, job="solo")
        started = daemon.events("run_started", run_id=started["run_id"])[0]
        if started["via"] == "trigger":
            break
    assert started["via"] == "trigger"
    run_id = started["run_id"]
    steps = query(
        database_url,
        "SELECT attempt, position, status FROM syncworker.run_steps WHERE run_id = %s",
        (run_id,),
    )
    assert steps == [(1, 0, "succeeded")]
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_two_workers_hearing_one_notify_run_it_once(database_url, tmp_path, start):
    """Both enqueue it: one creates and claims the run, the other's trigger
    joins it (or follows it up); the key never runs twice at once."""
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    pair = [start(config), start(config)]
    for _ in range(30):
        execute(database_url, "NOTIFY sync_trigger, 'solo'")
    wait_until(
        lambda: (
            query(
                database_url,
                "SELECT count(*) FROM syncworker.runs WHERE status IN ('pending', 'running')",
            )
            == [(0,)]
            and sum(len(d.events("trigger_enqueued")) for d in pair) == 60
        ),
        what="every NOTIFY enqueued by both and served",
    )
    # Which way each run became whose (claim, reservation, or claimed by the
    # enqueueing call) depends on timing; that the key never ran twice at
    # once does not: the invariants below.
    for d in pair:
        assert d.stop() == 0
    assert_invariants(database_url)


def test_triggers_that_joined_a_reserved_run_are_served_by_it(database_url, tmp_path, start):
    """The claim is in before the step begins, so a trigger that joined the
    still-pending run came before the step: the run serves it, no follow-up."""
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    worker_id = _worker_id(database_url, daemon)
    run_id = _pending_run(database_url, "solo", reserved_for=worker_id)
    execute(database_url, "UPDATE syncworker.runs SET triggers = 3 WHERE id = %s", (run_id,))
    _notify_reservation(database_url, run_id)
    assert daemon.wait_for("run_started", run_id=run_id)["via"] == "reservation"
    wait_until(lambda: _status(database_url, run_id)[0] == "succeeded", what="run succeeded")
    [(requested, started)] = query(
        database_url,
        "SELECT requested_at, started_at FROM syncworker.runs WHERE id = %s",
        (run_id,),
    )
    assert started > requested
    assert query(database_url, "SELECT count(*) FROM syncworker.runs") == [(1,)]
    assert not daemon.events("followup_requested")
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_a_payload_never_goes_out_on_the_wake_channel(database_url, tmp_path, start):
    """Any role may LISTEN; a trigger's payload is for those who may read runs."""
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN syncworker_wake")
        _idle(database_url, daemon)
        run_id = trigger(database_url, "solo", secret="s3cr3t-value")
        # Reserved like a trigger without a payload (014): the wake names
        # the worker and the run, and the worker reads the payload from the
        # row its claim returns.
        assert daemon.wait_for("run_started", run_id=run_id)["via"] == "reservation"
        heard = []
        # Until the reservation trigger() sends at commit: it went out before
        # the run started, so it is there to read.
        for n in listener.notifies(timeout=10.0):
            heard.append(n.payload)
            if f'"id" : {run_id}' in n.payload:
                break
    assert f'"id" : {run_id}' in heard[-1], heard
    assert not any("s3cr3t-value" in p for p in heard), heard
    daemon.wait_for("run_succeeded", run_id=run_id)
    [(payload,)] = query(database_url, "SELECT payload FROM test_log WHERE run_id = %s", (run_id,))
    assert payload == {"secret": "s3cr3t-value"}  # the step had it all the same
    assert daemon.stop() == 0


def test_no_reservation_for_a_frozen_worker(database_url, tmp_path, start):
    """A frozen worker (SIGSTOP) keeps its lock, so the lock test passes; its
    heartbeat older than its own takeover_after (0.8 s here) is what tells."""
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    worker_id = _idle(database_url, daemon)
    daemon.signal(signal.SIGSTOP)
    try:
        wait_until(
            lambda: (
                query(
                    database_url,
                    "SELECT now() - heartbeat_at > make_interval(secs => takeover_after)"
                    " FROM syncworker.workers WHERE id = %s",
                    (worker_id,),
                )
                == [(True,)]
            ),
            what="the frozen worker's heartbeat older than its takeover_after",
        )
        run_id = trigger(database_url, "solo")
        assert _status(database_url, run_id) == ("pending", None, None)
    finally:
        daemon.signal(signal.SIGCONT)
    # Thawed, it claims the run like any other, not from a reservation.
    started = daemon.wait_for("run_started", run_id=run_id)
    assert started["via"] != "reservation"
    wait_until(lambda: _status(database_url, run_id)[0] == "succeeded", what="run succeeded")
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_a_claim_in_flight_at_the_stop_is_answered_before_the_drain(database_url, tmp_path, start):
    """A reservation's claim waiting on the run's row when SIGTERM comes: the
    stop waits for its answer, and the run it made ours is drained (run to
    its end) before the worker says it stopped, not left `running` under a
    stopped worker by a statement that commits after the exit."""
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    worker_id = _idle(database_url, daemon)
    run_id = _pending_run(database_url, "solo", reserved_for=worker_id)
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT 1 FROM syncworker.runs WHERE id = %s FOR UPDATE", (run_id,))
        _notify_reservation(database_url, run_id)
        # The listener's claim gives up on the row lock (50 ms) and goes on
        # waiting on a pooled connection.
        wait_until(
            lambda: (
                query(
                    database_url,
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND query LIKE '%%reserved_for%%'",
                )
                != [(0,)]
            ),
            what="the claim waiting for the run's row",
        )
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("drain_started")
        time.sleep(0.5)
    # The holder's transaction ends: the claim answers.
    assert daemon.wait_exit(30) == 0
    names = [r.get("event") for r in daemon.records]
    assert "run_started" in names
    assert names.index("run_started") < names.index("worker_stopped")
    assert _status(database_url, run_id) == ("succeeded", None, worker_id)
    assert_invariants(database_url)
