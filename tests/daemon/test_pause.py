"""Pause and resume (issue 16; SPEC "Operating it"), with real daemons: a
hold seen by two workers at once, kept across a restart, ending by itself
at `until` within a second, holding cron fires without catching them up,
holding one scope only; the CLI and the Python API; bad input refused with
nothing changed; every action recorded."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from syncworker import ControlError, pause_blocking, resume_blocking
from tests.harness import cli, execute, query, wait_until, write_config
from tests.invariants import assert_invariants, trigger

JOBS = """
[jobs.solo]
steps = ["sw_testjobs:record"]

[jobs.flaky]
steps = ["sw_testjobs:record"]
retries = 3
retry_backoff = 1

[jobs.pfa]
scopes = ["A", "B"]
steps = ["sw_testjobs:record"]

[jobs.tick]
schedule = "* * * * * *"
steps = ["sw_testjobs:record"]
"""


def status(url: str, run_id: int) -> str:
    [(s,)] = query(url, "SELECT status FROM syncworker.runs WHERE id = %s", (run_id,))
    return str(s)


def stays_pending(url: str, run_id: int, seconds: float = 1.5) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert status(url, run_id) == "pending"
        time.sleep(0.1)


def test_a_pause_holds_the_job_on_every_worker_until_resumed(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, JOBS, concurrency=2)
    workers = [start(config), start(config)]
    [(hold,)] = query(
        database_url,
        "SELECT row_to_json(p) FROM syncworker.pause('solo', reason => 'vendor down') p",
    )
    [(me,)] = query(database_url, "SELECT session_user::text")
    assert hold["paused_by"] == me and hold["reason"] == "vendor down"
    run_id = trigger(database_url, "solo")
    # A NOTIFY trigger (claimed by the call that enqueues it when the key is free).
    execute(database_url, "NOTIFY sync_trigger, 'solo'")
    stays_pending(database_url, run_id)
    assert query(database_url, "SELECT count(*) FROM syncworker.runs WHERE job = 'solo'") == [(1,)]
    assert [w.events("run_started", job="solo") for w in workers] == [[], []]
    shown = json.loads(cli("status", "--json", "--config", str(config)).stdout)
    [solo] = [j for j in shown["jobs"] if j["name"] == "solo"]
    assert solo["paused"] is True
    assert (solo["paused_by"], solo["paused_reason"], solo["paused_until"]) == (
        me,
        "vendor down",
        None,
    )
    assert query(database_url, "SELECT syncworker.resume('solo')") == [(True,)]
    wait_until(lambda: status(database_url, run_id) == "succeeded", what="the run after resume")
    actions = query(database_url, "SELECT actor, action, job FROM syncworker.actions ORDER BY id")
    assert actions == [(me, "pause", "solo"), (me, "resume", "solo")]
    for w in workers:
        assert w.stop() == 0
    assert_invariants(database_url)


def test_a_pause_survives_a_restart(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    first = start(config)
    execute(database_url, "SELECT syncworker.pause('solo')")
    assert first.stop() == 0
    second = start(config)
    run_id = trigger(database_url, "solo")
    stays_pending(database_url, run_id)
    execute(database_url, "SELECT syncworker.resume('solo')")
    wait_until(lambda: status(database_url, run_id) == "succeeded", what="the run after resume")
    assert second.stop() == 0


def test_a_pause_until_ends_by_itself_within_a_second(database_url, tmp_path, start):
    # heartbeat_interval 10: the heartbeat's safety-net look for pending runs
    # comes every 2.5 s, so starting within a second is the scheduler waking
    # at the hold's end.
    jobs = JOBS.replace('schedule = "* * * * * *"', 'schedule = "0 0 1 1 *"')
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs, heartbeat_interval=10))
    [(until,)] = query(
        database_url,
        "SELECT until FROM syncworker.pause('solo', until => now() + interval '2 seconds')",
    )
    run_id = trigger(database_url, "solo")
    stays_pending(database_url, run_id, 1.0)
    started = daemon.wait_for("run_started", run_id=run_id, timeout=10)
    at = datetime.fromisoformat(started["timestamp"].replace("Z", "+00:00"))
    late = (at - until).total_seconds()
    assert 0 <= late < 1.0, late
    assert daemon.stop() == 0


def test_cron_fires_while_paused_are_not_run_nor_caught_up(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    daemon.wait_for("cron_fired", job="tick", timeout=10)
    execute(database_url, "SELECT syncworker.pause('tick')")
    [(paused_at,)] = query(database_url, "SELECT max(id) FROM syncworker.runs WHERE job = 'tick'")
    daemon.wait_for("cron_fire_held", job="tick", count=3, timeout=10)
    [(during,)] = query(
        database_url,
        "SELECT count(*) FROM syncworker.runs WHERE job = 'tick' AND id > %s",
        (paused_at,),
    )
    assert during == 0
    execute(database_url, "SELECT syncworker.resume('tick')")
    fired = len(daemon.events("cron_fired", job="tick"))
    daemon.wait_for("cron_fired", job="tick", count=fired + 1, timeout=10)
    time.sleep(0.5)
    # No burst of the fires missed while held: one run per fire from the resume on.
    rows = query(
        database_url,
        "SELECT scheduled_for FROM syncworker.runs WHERE job = 'tick' AND id > %s ORDER BY id",
        (paused_at,),
    )
    assert 1 <= len(rows) <= 2, rows
    assert daemon.stop() == 0


def test_a_scope_pause_holds_that_scope_only(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS, concurrency=2))
    execute(database_url, "SELECT syncworker.pause('pfa', 'A', reason => 'tenant A migrating')")
    a, b = trigger(database_url, "pfa", "A"), trigger(database_url, "pfa", "B")
    wait_until(lambda: status(database_url, b) == "succeeded", what="scope B's run")
    stays_pending(database_url, a, 1.0)
    [pfa] = [
        j
        for j in json.loads(cli("status", "--json", "--database-url", database_url).stdout)["jobs"]
        if j["name"] == "pfa"
    ]
    assert pfa["paused"] is False
    assert [(s["scope"], s["paused_reason"]) for s in pfa["paused_scopes"]] == [
        ("A", "tenant A migrating")
    ]
    # The whole job's resume does not lift a scope's hold: it is named.
    assert query(database_url, "SELECT syncworker.resume('pfa')") == [(False,)]
    stays_pending(database_url, a, 0.5)
    assert query(database_url, "SELECT syncworker.resume('pfa', 'A')") == [(True,)]
    wait_until(lambda: status(database_url, a) == "succeeded", what="scope A's run")
    assert daemon.stop() == 0


def test_the_cli_pauses_shows_and_resumes(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    daemon = start(config)
    paused = cli(
        "pause", "solo", "--for", "2h", "--reason", "vendor down", "--by", "ops-anna",
        "--config", str(config),
    )  # fmt: skip
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.startswith("paused solo until ")
    table = cli("status", "--config", str(config)).stdout
    assert "by ops-anna, until " in table, table
    assert "(in 2.0h) (vendor down)" in table, table
    run_id = trigger(database_url, "solo")
    stays_pending(database_url, run_id, 1.0)
    resumed = cli("resume", "solo", "--config", str(config))
    assert (resumed.returncode, resumed.stdout.strip()) == (0, "resumed solo")
    wait_until(lambda: status(database_url, run_id) == "succeeded", what="the run after resume")
    again = cli("resume", "solo", "--config", str(config))
    assert (again.returncode, again.stdout.strip()) == (0, "solo was not paused")
    [(actor, detail)] = query(
        database_url, "SELECT actor, detail FROM syncworker.actions WHERE action = 'pause'"
    )
    # The record names the role that acted; `--by` is what it said, kept beside.
    [(me,)] = query(database_url, "SELECT session_user::text")
    assert (actor, detail["by"], detail["reason"]) == (me, "ops-anna", "vendor down")
    shown = json.loads(cli("status", "--json", "--config", str(config)).stdout)["actions"]
    assert [(a["action"], a["job"]) for a in shown] == [
        ("resume", "solo"),
        ("resume", "solo"),
        ("pause", "solo"),
    ]
    assert shown[-1]["actor"] == me and shown[-1]["detail"]["by"] == "ops-anna"
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["pause", "nope"], 1, "unknown job 'nope' (known jobs: flaky, pfa, solo, tick)"),
        (["pause", "pfa", "--scope", "C"], 1, "unknown scope 'C' for job 'pfa' (scopes: A, B)"),
        (["pause", "solo", "--scope", "A"], 1, "unknown scope 'A' for job 'solo'"),
        (["pause", "solo", "--until", "2001-01-01T00:00+00:00"], 1, "is not in the future"),
        (["pause", "solo", "--for", "soon"], 2, "'soon' is not a duration"),
        (["pause", "solo", "--for", "0s"], 2, "not a positive duration"),
        (["pause", "solo", "--until", "tomorrow"], 2, "'tomorrow' is not a time"),
        (["pause", "solo", "--for", "1h", "--until", "2099-01-01"], 2, "not both"),
        (["resume", "nope"], 1, "unknown job 'nope'"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    database_url: str, tmp_path: Path, args: list[str], code: int, message: str
):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0
    done = cli(*args, "--config", str(config))
    assert done.returncode == code, done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert query(database_url, "SELECT count(*) FROM syncworker.pauses") == [(0,)]
    assert query(database_url, "SELECT count(*) FROM syncworker.actions") == [(0,)]


def test_the_python_api(database_url, tmp_path):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        ends = datetime(2099, 1, 1, tzinfo=UTC)
        hold = pause_blocking(conn, "pfa", "B", until=ends, reason="r", by="app")
        assert (hold.job, hold.scope, hold.until, hold.paused_by) == ("pfa", "B", ends, "app")
        with pytest.raises(ControlError, match="unknown scope 'Z'"):
            pause_blocking(conn, "pfa", "Z")
        assert resume_blocking(conn, "pfa", "B") is True
        assert resume_blocking(conn, "pfa", "B") is False


def test_only_a_granted_role_may_pause_and_none_may_write_the_holds(database_url, tmp_path):
    from tests.db.test_security import Roles

    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0
    made = Roles(database_url)
    try:
        app = made.create("app")
        made.admin(
            f'GRANT USAGE ON SCHEMA syncworker TO "{app.name}";'
            f" GRANT EXECUTE ON FUNCTION syncworker.trigger(text, text, text, text, jsonb,"
            f' timestamptz, interval) TO "{app.name}"'
        )
        with psycopg.connect(app.url, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT syncworker.pause('solo')")
            for statement in (
                "INSERT INTO syncworker.pauses (job, paused_by) VALUES ('solo', 'me')",
                "DELETE FROM syncworker.pauses",
                "SELECT * FROM syncworker.actions",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
        made.admin(
            f"GRANT EXECUTE ON FUNCTION syncworker.pause(text, text, timestamptz, text, text),"
            f' syncworker.resume(text, text, text) TO "{app.name}"'
        )
        with psycopg.connect(app.url, autocommit=True) as conn:
            conn.execute("SELECT syncworker.pause('solo')")
            assert conn.execute("SELECT syncworker.resume('solo')").fetchone() == (True,)
        assert query(database_url, "SELECT DISTINCT actor FROM syncworker.actions") == [(app.name,)]
    finally:
        made.drop_all()


def test_the_upgrade_lets_every_reader_of_jobs_read_the_holds(database_url, tmp_path):
    """An app set up by version 9's README reads jobs: after 010 its status
    (and a UI) sees the holds too, and still not the record."""
    from tests.db.test_security import Roles, _migrate_to

    _migrate_to(database_url, 9)
    made = Roles(database_url)
    try:
        reader = made.create("reader")
        made.admin(
            f'GRANT USAGE ON SCHEMA syncworker TO "{reader.name}";'
            f' GRANT SELECT ON syncworker.jobs TO "{reader.name}"'
        )
        config = write_config(tmp_path / "c.toml", database_url, JOBS)
        upgraded = cli("migrate", "--config", str(config))
        assert re.search(r"migrations applied: 10(, \d+)*;", upgraded.stdout), upgraded.stdout
        with psycopg.connect(reader.url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM syncworker.pauses").fetchone() == (0,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM syncworker.actions")
    finally:
        made.drop_all()


@pytest.mark.parametrize("until", ["'infinity'", "'10000-01-01 00:00+00'"])
def test_an_until_beyond_what_a_worker_can_read_is_refused(database_url, tmp_path, until):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="too far"):
        query(database_url, f"SELECT syncworker.pause('solo', until => {until})")
    assert query(database_url, "SELECT count(*) FROM syncworker.pauses") == [(0,)]
    far = cli("pause", "solo", "--until", "9999-12-31T23:59:59-05:00", "--config", str(config))
    assert far.returncode == 2 and "too far" in far.stderr, far.stderr
    huge = cli("pause", "solo", "--for", "99999999999d", "--config", str(config))
    assert huge.returncode == 2 and "too long" in huge.stderr, huge.stderr


def test_a_fire_due_inside_a_hold_is_not_run_however_late_it_is_handled(database_url, tmp_path):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0
    [(paused_at, until)] = query(
        database_url,
        "SELECT paused_at, until FROM syncworker.pause('tick', until => now() + interval '1 second')",
    )
    time.sleep(1.2)  # the hold has ended; a worker handles an old fire only now
    fire = "SELECT run_id FROM syncworker.trigger('tick', NULL, 'cron', 'cron', '{}', %s)"
    assert query(database_url, fire, (paused_at + (until - paused_at) / 2,)) == []
    assert len(query(database_url, fire, (until,))) == 1  # due when the hold had ended


def test_a_retry_waits_as_pending_while_its_job_is_paused(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    run_id = trigger(database_url, "flaky", None, fail_times=1)
    daemon.wait_for("run_retrying", run_id=run_id)  # attempt 1 failed; 1 s before the next
    execute(database_url, "SELECT syncworker.pause('flaky', reason => 'vendor down')")
    wait_until(lambda: status(database_url, run_id) == "pending", timeout=5, what="requeued")
    stays_pending(database_url, run_id, 1.0)
    assert daemon.events("run_cancelled", run_id=run_id)[0]["reason"].startswith("held by a pause")
    execute(database_url, "SELECT syncworker.resume('flaky')")
    wait_until(lambda: status(database_url, run_id) == "succeeded", what="the retry after resume")
    assert daemon.stop() == 0
