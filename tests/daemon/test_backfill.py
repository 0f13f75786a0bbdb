"""Backfill and misfire = "all" (issue 16; SPEC "Backfill"), with real
daemons: exactly one run per missed fire across two instances starting at
once, oldest first and one at a time per key, capped at misfire_limit (the
latest kept), fires inside a pause left out; `syncworker backfill` queuing
one run per fire of a window that has none, idempotent, per scope; bad input
refused with nothing written; who may backfill; every backfill recorded."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from syncworker import ControlError
from syncworker.backfill import backfill
from tests.harness import cli, execute, query, wait_until, write_config
from tests.invariants import assert_invariants

MINUTELY = """
[jobs.tick]
schedule = "* * * * *"
misfire = "all"
steps = ["sw_testjobs:record"]
"""

WINDOWED = """
[jobs.report]
schedule = "*/10 * * * *"
scopes = ["A", "B"]
misfire_limit = 6
steps = ["sw_testjobs:record"]

[jobs.adhoc]
steps = ["sw_testjobs:record"]
"""

# A window of report's fires, long past: 00:00, 00:10, ..., 00:50.
FROM, TO = "2026-12-01T00:00+00:00", "2026-12-01T00:50+00:00"
FIRES = [datetime(2026, 12, 1, 0, m, tzinfo=UTC) for m in range(0, 60, 10)]


def backfill_runs(url: str, job: str) -> list[tuple[int, str | None, datetime, str]]:
    return query(
        url,
        "SELECT id, scope, scheduled_for, status FROM syncworker.runs"
        " WHERE job = %s AND source = 'backfill' ORDER BY id",
        (job,),
    )


def assert_one_at_a_time_oldest_first(url: str, job: str) -> None:
    """Per key, each run started after the one of the fire before it ended,
    by the times the runs recorded."""
    keys = query(
        url,
        "SELECT scope, array_agg(started_at ORDER BY scheduled_for),"
        " array_agg(finished_at ORDER BY scheduled_for)"
        " FROM syncworker.runs WHERE job = %s AND source = 'backfill' GROUP BY scope",
        (job,),
    )
    assert keys
    for scope, starts, ends in keys:
        for n in range(1, len(starts)):
            assert starts[n] >= ends[n - 1], (scope, n, starts, ends)


def missed_minutes(url: str, minutes: int) -> None:
    """As if every worker had been down: the last fire claimed `minutes` ago."""
    execute(
        url,
        "UPDATE syncworker.jobs SET last_fire_at = date_trunc('minute', now())"
        " - make_interval(mins => %s) WHERE name = 'tick'",
        (minutes,),
    )


def test_misfire_all_runs_each_missed_fire_once_across_two_instances(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, MINUTELY, concurrency=2)
    assert cli("migrate", "--config", str(config)).returncode == 0
    missed_minutes(database_url, 10)
    workers = [start(config, wait_ready=False), start(config, wait_ready=False)]
    for w in workers:
        w.ready()
    wait_until(
        lambda: [e for w in workers for e in w.events("misfire_backfilled")], what="backfill"
    )
    said = [e for w in workers for e in w.events("misfire_backfilled")]
    assert len(said) == 1, said  # one instance claimed the fire, and queued them all
    [told] = said
    assert told["fires"] in (10, 11) and told["capped"] is False  # 11: a minute turned meanwhile
    wait_until(
        lambda: all(s == "succeeded" for *_, s in backfill_runs(database_url, "tick")),
        what="every backfill run",
    )
    runs = backfill_runs(database_url, "tick")
    fires = [f for _, _, f, _ in runs]
    last = datetime.fromisoformat(told["last"])
    assert fires == [last - timedelta(minutes=n) for n in reversed(range(told["fires"]))]
    assert [r for r, *_ in runs] == told["runs"]
    assert_one_at_a_time_oldest_first(database_url, "tick")
    for w in workers:
        assert w.stop() == 0
    assert_invariants(database_url, pending_ok=True)


def test_misfire_limit_keeps_the_latest_fires(database_url, tmp_path, start):
    jobs = MINUTELY + "misfire_limit = 3\n"
    config = write_config(tmp_path / "c.toml", database_url, jobs)
    assert cli("migrate", "--config", str(config)).returncode == 0
    missed_minutes(database_url, 10)
    daemon = start(config)
    told = daemon.wait_for("misfire_backfilled", timeout=10)
    assert (told["fires"], told["capped"]) == (3, True)
    last = datetime.fromisoformat(told["last"])
    wait_until(lambda: len(backfill_runs(database_url, "tick")) == 3, what="3 runs")
    fires = [f for _, _, f, _ in backfill_runs(database_url, "tick")]
    assert fires == [last - timedelta(minutes=2), last - timedelta(minutes=1), last]
    assert daemon.stop() == 0


def test_misfire_all_leaves_out_the_fires_inside_a_pause(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, MINUTELY)
    assert cli("migrate", "--config", str(config)).returncode == 0
    missed_minutes(database_url, 10)
    # A hold made 20 minutes ago that ended 5 minutes ago, as pause() writes it.
    execute(
        database_url,
        "INSERT INTO syncworker.pauses (job, paused_at, paused_by, until) VALUES ('tick',"
        " now() - interval '20 minutes', 'ops', date_trunc('minute', now()) - interval '4 minutes')",
    )
    daemon = start(config)
    told = daemon.wait_for("misfire_backfilled", timeout=10)
    wait_until(lambda: len(backfill_runs(database_url, "tick")) == len(told["runs"]), what="runs")
    [(hold_end,)] = query(database_url, "SELECT until FROM syncworker.pauses")
    fires = [f for _, _, f, _ in backfill_runs(database_url, "tick")]
    assert fires and all(f >= hold_end for f in fires), (fires, hold_end)
    assert len(fires) == told["fires"] - 5  # -9 .. -5 minutes fell inside the hold
    assert daemon.stop() == 0


def test_backfill_queues_one_run_per_fire_of_the_window_and_only_once(
    database_url, tmp_path, start
):
    daemon = start(write_config(tmp_path / "c.toml", database_url, WINDOWED, concurrency=2))
    config = str(daemon.config)
    done = cli(
        "backfill", "report", "--from", FROM, "--to", TO, "--by", "ops-anna", "--config", config
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("queued 12 runs of report for 6 fires (0 had a run already)")
    wait_until(
        lambda: [s for *_, s in backfill_runs(database_url, "report")] == ["succeeded"] * 12,
        what="the 12 backfill runs",
    )
    runs = backfill_runs(database_url, "report")
    for scope in ("A", "B"):
        assert [f for _, s, f, _ in runs if s == scope] == FIRES
    assert_one_at_a_time_oldest_first(database_url, "report")
    [(by,)] = query(
        database_url, "SELECT DISTINCT triggered_by FROM syncworker.runs WHERE source = 'backfill'"
    )
    assert by == "ops-anna"

    # Again: every fire has its run, nothing is queued.
    again = cli("backfill", "report", "--from", FROM, "--to", TO, "--json", "--config", config)
    assert again.returncode == 0, again.stderr
    shown = json.loads(again.stdout)
    assert (shown["queued"], shown["already_ran"], len(shown["fires"])) == ([], 12, 6)

    # One scope of a later window.
    later = cli(
        "backfill",
        "report",
        "--scope",
        "A",
        "--from",
        "2026-12-01T01:00+00:00",
        "--to",
        "2026-12-01T01:20+00:00",
        "--json",
        "--config",
        config,
    )
    assert later.returncode == 0, later.stderr
    queued = json.loads(later.stdout)["queued"]
    assert [(r["scope"], r["scheduled_for"][11:16]) for r in queued] == [
        ("A", "01:00"),
        ("A", "01:10"),
        ("A", "01:20"),
    ]
    actions = query(
        database_url,
        "SELECT action, job, scope, detail->>'queued' FROM syncworker.actions ORDER BY id",
    )
    assert actions == [
        ("backfill", "report", None, "12"),
        ("backfill", "report", None, "0"),
        ("backfill", "report", "A", "3"),
    ]
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_a_trigger_does_not_join_a_backfill_run(database_url, tmp_path):
    config = write_config(tmp_path / "c.toml", database_url, WINDOWED)
    assert cli("migrate", "--config", str(config)).returncode == 0
    assert (
        cli(
            "backfill", "report", "-s", "A", "--from", FROM, "--to", TO, "--config", str(config)
        ).returncode
        == 0
    )
    [(run_id, created)] = query(database_url, "SELECT * FROM syncworker.trigger('report', 'A')")
    assert created is True
    again = query(database_url, "SELECT * FROM syncworker.trigger('report', 'A')")
    assert again == [(run_id, False)]  # triggers still coalesce among themselves
    [(pending,)] = query(
        database_url, "SELECT count(*) FROM syncworker.runs WHERE status = 'pending'"
    )
    assert pending == 7


def test_bad_backfills_are_refused_and_write_nothing(database_url, tmp_path):
    config = write_config(tmp_path / "c.toml", database_url, WINDOWED)
    assert cli("migrate", "--config", str(config)).returncode == 0
    c = ["--config", str(config)]
    cases = [
        (["report", "--from", TO, "--to", FROM], 2, "is after --to"),
        (["report", "--from", "yesterday", "--to", TO], 2, "is not a time"),
        (["nope", "--from", FROM, "--to", TO], 1, "unknown job 'nope'"),
        (["report", "-s", "Z", "--from", FROM, "--to", TO], 1, "unknown scope 'Z'"),
        (["adhoc", "--from", FROM, "--to", TO], 1, "has no schedule"),
        # 7 fires, more than misfire_limit = 6.
        (["report", "--from", FROM, "--to", "2026-12-01T01:00+00:00"], 1, "misfire_limit"),
    ]
    cases.append((["report", "--from", "0001-01-01T00:00+00:00", "--to", TO], 1, "after 1900"))
    for args, code, says in cases:
        refused = cli("backfill", *args, *c)
        assert refused.returncode == code, (args, refused.stdout, refused.stderr)
        assert says in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    never = write_config(tmp_path / "never.toml", database_url, WINDOWED, schema="sw_never_made")
    unset = cli("backfill", "report", "--from", FROM, "--to", TO, "--config", str(never))
    assert unset.returncode == 78 and "migrate" in unset.stderr, unset.stderr
    assert "Traceback" not in unset.stderr
    assert query(database_url, "SELECT count(*) FROM syncworker.runs") == [(0,)]
    assert query(database_url, "SELECT count(*) FROM syncworker.actions") == [(0,)]
    forced = cli(
        "backfill", "report", "--from", FROM, "--to", "2026-12-01T01:00+00:00", "--force", *c
    )
    assert forced.returncode == 0 and "queued 14 runs" in forced.stdout, forced.stdout

    with psycopg.connect(database_url, autocommit=True) as conn:
        for fires, says in [
            ("ARRAY[now() + interval '1 hour']", "is not a past time"),
            ("ARRAY[NULL]::timestamptz[]", "is not a past time"),
            ("ARRAY['0044-03-15 00:00+00 BC']::timestamptz[]", "is not a past time since 1900"),
            ("'{}'::timestamptz[]", "no fires given"),
            ("array_fill(now() - interval '1 day', ARRAY[10001])", "at most 10000"),
        ]:
            with pytest.raises(psycopg.errors.InvalidParameterValue, match=says):
                conn.execute(f"SELECT * FROM syncworker.backfill('report', fires => {fires})")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="reserved for backfill"):
            conn.execute("SELECT * FROM syncworker.trigger('adhoc', source => 'backfill')")


def test_backfill_from_python(database_url, tmp_path):
    config = write_config(tmp_path / "c.toml", database_url, WINDOWED)
    assert cli("migrate", "--config", str(config)).returncode == 0

    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            done = await backfill(conn, "report", FIRES[0], FIRES[-1], scope="B", by="fix")
            assert [r.scheduled_for for r in done.queued] == FIRES
            assert (done.already_ran, {r.scope for r in done.queued}) == (0, {"B"})
            with pytest.raises(ControlError, match="misfire_limit"):
                await backfill(conn, "report", FIRES[0], FIRES[0] + timedelta(hours=2))

    asyncio.run(go())


def test_only_a_granted_role_may_backfill(database_url, tmp_path):
    from tests.db.test_security import Roles

    config = write_config(tmp_path / "c.toml", database_url, WINDOWED)
    assert cli("migrate", "--config", str(config)).returncode == 0
    made = Roles(database_url)
    try:
        app = made.create("app")
        made.admin(
            f'GRANT USAGE ON SCHEMA syncworker TO "{app.name}";'
            f' GRANT EXECUTE ON FUNCTION syncworker.trigger TO "{app.name}"'
        )
        call = "SELECT * FROM syncworker.backfill('report', fires => ARRAY['2026-12-01 00:00+00']::timestamptz[])"
        with psycopg.connect(app.url, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(call)
            # Nor can it name a fire through trigger(), as before.
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(
                    "SELECT * FROM syncworker.trigger('report', 'A', scheduled_for => now())"
                )
        made.admin(
            "GRANT EXECUTE ON FUNCTION syncworker.backfill(text, text, timestamptz[], text, boolean)"
            f' TO "{app.name}"'
        )
        with psycopg.connect(app.url, autocommit=True) as conn:
            assert len(conn.execute(call).fetchall()) == 2
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(
                    "SELECT * FROM syncworker.trigger('report', 'A', scheduled_for => now())"
                )
        assert query(database_url, "SELECT actor, action FROM syncworker.actions") == [
            (app.name, "backfill")
        ]
    finally:
        made.drop_all()


COOPERATIVE = """
[jobs.report]
schedule = "*/10 * * * *"
steps = ["sw_testjobs:cooperative"]
"""


def test_a_drained_backfill_run_goes_back_beside_the_others(database_url, tmp_path, start):
    """SIGTERM while a backfill run works: it is redone later, not cancelled
    for the other fires pending behind it (they are not its follow-ups)."""
    daemon = start(write_config(tmp_path / "c.toml", database_url, COOPERATIVE))
    done = cli(
        "backfill",
        "report",
        "--from",
        FROM,
        "--to",
        "2026-12-01T00:20+00:00",
        "--config",
        str(daemon.config),
    )
    assert done.returncode == 0, done.stderr
    first = backfill_runs(database_url, "report")[0][0]
    daemon.wait_for("run_started", run_id=first, timeout=10)
    assert daemon.stop() == 0
    statuses = [(f, s) for _, _, f, s in backfill_runs(database_url, "report")]
    assert statuses == [(f, "pending") for f in FIRES[:3]], statuses
    assert_invariants(database_url, pending_ok=True)
