"""No message alone makes a worker run anything (issue 12, SPEC "Security").

PostgreSQL lets any role that can connect NOTIFY any channel, so a hostile
role can send a worker's wake channel whatever it likes: a reservation for an
unknown run, for another worker's run, for a run already running or
finished (a replay), one whose job and scope fields name other work, or a
flood of them. Real daemons; the sender is a role with nothing but CONNECT.
Each test asserts on execution itself (test_log rows the steps write, a
command's output file) and on the rows and counters users see.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.daemon.test_reserved import _worker_id
from tests.harness import Daemon, query, wait_until, write_config
from tests.invariants import assert_invariants, trigger

WAKE = "syncworker_wake"


@pytest.fixture
def intruder(database_url: str) -> Iterator[str]:
    """The login URL of a role that may only connect: no grant on syncworker."""
    name = f"sw_intruder_{secrets.token_hex(4)}"
    password = secrets.token_hex(8)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
    info = {**conninfo_to_dict(database_url), "user": name, "password": password}
    try:
        yield make_conninfo(**info)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (name,),
            )
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _send(url: str, payloads: list[str]) -> None:
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (WAKE, payload))


def _executions(url: str) -> list[tuple[int, str | None, str]]:
    return [
        (int(run_id), scope, step)
        for run_id, scope, step in query(
            url, "SELECT run_id, scope, step FROM test_log ORDER BY id"
        )
    ]


def _forgery(worker_id: str, run_id: int, **fields: object) -> str:
    """A reservation notification as trigger() of migration 5 wrote them,
    with every field an attacker might hope the worker believes."""
    return json.dumps(
        {
            "reserved_for": worker_id,
            "id": run_id,
            "job": "solo",
            "scope": None,
            "source": "forged",
            "triggered_by": "mallory",
            "scheduled_for": None,
            "attempt": 0,
            "max_attempts": 1,
            **fields,
        }
    )


JOBS = """
[jobs.solo]
steps = ["sw_testjobs:span"]

[jobs.tenants]
scopes = ["RIO", "HOU"]
steps = [{ command = ["sh", "-c", "echo \\"$0\\" >> \\"$OUT\\"", "{scope}"] }]

[jobs.hold]
steps = ["sw_testjobs:wait_release"]
"""


def _start(start, tmp_path: Path, database_url: str) -> tuple[Daemon, Path]:
    out = tmp_path / "command.out"
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    daemon = start(config, env={"OUT": str(out)})
    return daemon, out


def test_forged_wakes_start_nothing(database_url, tmp_path, start, intruder):
    daemon, out = _start(start, tmp_path, database_url)
    me = _worker_id(database_url, daemon)
    # Work that exists: a finished run (to replay), and a pending run of
    # another key that is not reserved for anyone (to steal).
    done = trigger(database_url, "solo", ms=1)
    wait_until(
        lambda: (
            query(database_url, "SELECT status FROM syncworker.runs WHERE id = %s", (done,))
            == [("succeeded",)]
        ),
        what="the first run succeeded",
    )
    before = _executions(database_url)
    assert [step for _, _, step in before] == ["span_start", "span_end"]
    # A pending run reserved for nobody: the queue claims it on the next
    # wake-up, from its row; the forged message about it must change nothing.
    [(pending,)] = query(
        database_url,
        "INSERT INTO syncworker.runs (job, scope, status, source)"
        " VALUES ('tenants', 'RIO', 'pending', 'test') RETURNING id",
    )
    forgeries = [
        _forgery(me, done),  # a replay of a finished run
        _forgery(me, done, attempt=5, job="tenants", scope="--evil"),
        _forgery(me, 10**12),  # no such run
        _forgery("someone-else", done),
        _forgery(me, int(pending), scope="; touch /tmp/pwned #"),  # not reserved for us
        _forgery(me, -1),
        json.dumps({"reserved_for": me, "id": "1; DROP TABLE syncworker.runs"}),
        json.dumps({"reserved_for": me, "id": True}),
        json.dumps([me, done]),
        "{not json",
    ]
    _send(intruder, forgeries)
    # The wake-up that comes after them: the worker has read them all by the
    # time it logs this trigger's outcome.
    sentinel = trigger(database_url, "solo", ms=1)
    daemon.wait_for("run_succeeded", run_id=sentinel)
    # The pending run was never reserved for this worker: it starts only as
    # a queue claim (from its row), never from the forged message.
    executed = _executions(database_url)
    assert [row for row in executed if row[0] == done] == [
        (done, None, "span_start"),
        (done, None, "span_end"),
    ]
    assert {row[0] for row in executed} <= {done, sentinel}
    starts = daemon.events("run_started")
    assert {s["run_id"] for s in starts} <= {done, sentinel, int(pending)}
    # Once: its own start (a reservation, since 014 for a payload too), never
    # again from a replayed message.
    assert len([s for s in starts if s["run_id"] == done]) == 1
    # The command ran at most for the row's scope, never for the message's.
    if out.exists():
        assert out.read_text().split() in ([], ["RIO"])
    [(attempt, status)] = query(
        database_url, "SELECT attempt, status FROM syncworker.runs WHERE id = %s", (done,)
    )
    assert (attempt, status) == (1, "succeeded")
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_a_forged_wake_for_a_reserved_run_runs_what_the_row_says(
    database_url, tmp_path, start, intruder
):
    """A real reservation, and a forged wake for it carrying another job, scope
    and attempt: the run starts once, from its row."""
    daemon, out = _start(start, tmp_path, database_url)
    me = _worker_id(database_url, daemon)
    # Busy, so the real trigger is not reserved: a reservation made by hand
    # (as trigger() would) that only the forged wake names.
    [(run_id,)] = query(
        database_url,
        "INSERT INTO syncworker.runs (job, scope, status, source, reserved_for, max_attempts)"
        " VALUES ('tenants', 'RIO', 'pending', 'test', %s, 1) RETURNING id",
        (me,),
    )
    _send(
        intruder,
        [
            _forgery(me, int(run_id), job="solo", scope="--evil", attempt=3)
            for _ in range(5)  # and repeated: claimed once
        ],
    )
    started = daemon.wait_for("run_started", run_id=run_id)
    assert started["via"] == "reservation"
    assert (started["job"], started["scope"], started["attempt"]) == ("tenants", "RIO", 1)
    daemon.wait_for("run_succeeded", run_id=run_id)
    assert out.read_text().split() == ["RIO"]
    assert len(daemon.events("run_started", run_id=run_id)) == 1
    assert _executions(database_url) == []  # solo (the message's job) never ran
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_forged_wakes_cannot_run_a_key_twice_or_pass_concurrency(
    database_url, tmp_path, start, intruder
):
    """Concurrency 1, a run in progress: forged wakes for it, for a pending
    run of another key and a flood for made-up ids start nothing more."""
    daemon, out = _start(start, tmp_path, database_url)
    me = _worker_id(database_url, daemon)
    hold = trigger(database_url, "hold")
    daemon.wait_for("run_started", run_id=hold)
    waiting = trigger(database_url, "tenants", "HOU")  # pending: the slot is taken
    flood = [_forgery(me, hold), _forgery(me, waiting)] * 50
    # Enough that one statement each, ahead of the heartbeat's, would make
    # the worker's lease lapse and stop its own run.
    flood += [_forgery(me, 10**9 + i) for i in range(5000)]
    _send(intruder, flood)
    # A trigger sent after the flood, on the same session: the worker reads
    # notifications in order, so once it has enqueued this one it has acted
    # on every forged wake. A second more for claims still in flight: the
    # window in which a forged wake would have had to start something.
    with psycopg.connect(intruder, autocommit=True) as conn:
        conn.execute("""NOTIFY sync_trigger, '{"job": "solo", "ms": 1}'""")
    [enqueued] = daemon.wait_for("trigger_enqueued")["runs"]
    probe = enqueued["run_id"]  # queued behind hold: not started
    time.sleep(1.0)
    rows = query(
        database_url,
        "SELECT id, status FROM syncworker.runs WHERE id = ANY(%s) ORDER BY id",
        ([hold, waiting, probe],),
    )
    assert rows == [(hold, "running"), (waiting, "pending"), (probe, "pending")]
    assert [s["run_id"] for s in daemon.events("run_started")] == [hold]
    assert not daemon.events("lease_lapsed") and not daemon.events("run_self_fenced")
    assert not out.exists()
    # The worker is fine: release the hold, and the queue runs as usual.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO test_release VALUES ('all')")
        conn.execute("NOTIFY test_release")
    daemon.wait_for("run_succeeded", run_id=probe)
    daemon.wait_for("run_succeeded", run_id=waiting)
    assert out.read_text().split() == ["HOU"]
    [(attempts,)] = query(
        database_url, "SELECT max(attempt) FROM syncworker.runs WHERE id = ANY(%s)", ([hold],)
    )
    assert attempts == 1
    assert daemon.stop() == 0
    assert_invariants(database_url)
