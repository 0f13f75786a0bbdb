"""One real daemon against a real PostgreSQL: triggers, cron, runs, coalescing."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import psycopg

from tests.harness import cli, execute, query, release, wait_until, write_config

JOBS = """
[jobs.sync]
scopes = ["RIO", "HOU"]
steps = ["sw_testjobs:record", "sw_testjobs:second", "sw_testjobs:plain"]

[jobs.solo]
steps = ["sw_testjobs:record"]
retries = 3
retry_backoff = 0.05

[jobs.block]
steps = ["sw_testjobs:wait_release"]

[jobs.skipper]
steps = ["sw_testjobs:wait_release"]
on_overlap = "skip"

[jobs.off]
steps = ["sw_testjobs:record"]
enabled = false
"""


def runs(url: str, where: str = "true") -> list[dict]:
    rows = query(
        url,
        "SELECT coalesce(json_agg(r ORDER BY id), '[]') FROM syncworker.runs r WHERE " + where,
    )
    return rows[0][0]


def finished(url: str, count: int, where: str = "true") -> list[dict]:
    return wait_until(
        lambda: (
            r
            if len(r := runs(url, where + " AND status NOT IN ('pending', 'running')")) >= count
            else None
        ),
        what=f"{count} finished runs where {where}",
    )


def test_notify_from_another_connection_runs_every_scope(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN sync_events")
        execute(database_url, "NOTIFY sync_trigger, 'sync'")
        done = finished(database_url, 2, "job = 'sync'")
        events = [json.loads(n.payload) for n in listener.notifies(timeout=2, stop_after=4)]

    assert sorted(r["scope"] for r in done) == ["HOU", "RIO"]
    for run in done:
        assert run["status"] == "succeeded", run
        assert run["source"] == "notify"
        assert run["attempt"] == 1
        assert (run["records_total"], run["records_inserted"], run["records_updated"]) == (10, 3, 7)
        # record counts 10 processed (3 + 7); the plain step adds 1.
        assert run["records_processed"] == 11
        assert run["duration_ms"] is not None and run["started_at"] and run["finished_at"]
        # Opaque (sql/007): the id the worker logs, no hostname or pid in it.
        assert run["worker_id"] == daemon.events("worker_started")[0]["worker_id"]
        assert re.fullmatch(r"w-[0-9a-f]{12}", run["worker_id"]), run["worker_id"]
    steps = query(
        database_url,
        "SELECT name, status, records_processed FROM syncworker.run_steps"
        " WHERE run_id = %s ORDER BY position",
        (done[0]["id"],),
    )
    assert steps == [
        ("sw_testjobs:record", "succeeded", 10),
        ("sw_testjobs:second", "succeeded", 0),
        ("sw_testjobs:plain", "succeeded", 1),
    ]
    kinds = sorted((e["event"], e["scope"]) for e in events)
    assert kinds == [
        ("run_started", "HOU"),
        ("run_started", "RIO"),
        ("run_succeeded", "HOU"),
        ("run_succeeded", "RIO"),
    ]
    assert daemon.events("trigger_received", payload="sync")
    for run in done:
        daemon.wait_for("run_succeeded", run_id=run["id"], job="sync", scope=run["scope"])


def test_json_trigger_with_scope_source_and_payload(database_url, tmp_path, start):
    start(write_config(tmp_path / "c.toml", database_url, JOBS))
    payload = {"job": "sync", "scope": "RIO", "source": "api", "triggered_by": "admin", "k": [1]}
    execute(database_url, "SELECT pg_notify('sync_trigger', %s)", (json.dumps(payload),))
    [run] = finished(database_url, 1)
    assert (run["job"], run["scope"], run["source"], run["triggered_by"]) == (
        "sync",
        "RIO",
        "api",
        "admin",
    )
    assert run["payload"] == {"k": [1]}
    logged = query(database_url, "SELECT payload, source FROM test_log WHERE step = 'record'")
    assert logged == [({"k": [1]}, "api")]


def test_failure_of_one_scope_leaves_the_others(database_url, tmp_path, start):
    jobs = """
[jobs.multi]
scopes = ["A", "BAD", "C"]
steps = ["sw_testjobs:record", "sw_testjobs:second"]
"""
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs))
    execute(database_url, "NOTIFY sync_trigger, 'multi'")
    done = {r["scope"]: r for r in finished(database_url, 3)}
    assert done["A"]["status"] == done["C"]["status"] == "succeeded"
    assert done["BAD"]["status"] == "failed"
    assert done["BAD"]["error"] == "RuntimeError: scope BAD is broken"
    # The failed step is recorded, and the step after it never started.
    steps = query(
        database_url,
        "SELECT name, status, error FROM syncworker.run_steps WHERE run_id = %s",
        (done["BAD"]["id"],),
    )
    assert steps == [("sw_testjobs:record", "failed", "RuntimeError: scope BAD is broken")]
    daemon.wait_for("run_failed", scope="BAD", error="RuntimeError: scope BAD is broken")


def test_retries_with_backoff_then_success_or_failure(database_url, tmp_path, start):
    start(write_config(tmp_path / "c.toml", database_url, JOBS))
    execute(
        database_url, """SELECT * FROM syncworker.trigger('solo', payload => '{"fail_times": 2}')"""
    )
    [ok] = finished(database_url, 1)
    assert ok["status"] == "succeeded" and ok["attempt"] == 3
    attempts = query(
        database_url,
        "SELECT attempt, status FROM syncworker.run_steps WHERE run_id = %s ORDER BY attempt",
        (ok["id"],),
    )
    assert attempts == [(1, "failed"), (2, "failed"), (3, "succeeded")]

    execute(
        database_url, """SELECT * FROM syncworker.trigger('solo', payload => '{"fail_times": 9}')"""
    )
    [_, bad] = finished(database_url, 2)
    assert bad["status"] == "failed"
    assert bad["attempt"] == 4  # the first try and 3 retries
    assert bad["error"] == "ValueError: failing attempt 4 on purpose"


def test_timeout_fails_the_attempt(database_url, tmp_path, start):
    jobs = """
[jobs.slowjob]
steps = ["sw_testjobs:slow"]
timeout = 0.5
"""
    start(write_config(tmp_path / "c.toml", database_url, jobs))
    execute(database_url, "NOTIFY sync_trigger, 'slowjob'")
    [run] = finished(database_url, 1)
    assert run["status"] == "failed"
    assert run["error"] == "timed out after 0.5 s"
    assert 400 <= run["duration_ms"] < 10_000


def test_coalescing_one_pending_per_key(database_url, tmp_path, start):
    start(write_config(tmp_path / "c.toml", database_url, JOBS))
    [(first,)] = query(database_url, "SELECT run_id FROM syncworker.trigger('block')")
    wait_until(lambda: runs(database_url, "status = 'running'"), what="first run running")
    ids = set()
    for _ in range(5):
        [(run_id,)] = query(database_url, "SELECT run_id FROM syncworker.trigger('block')")
        ids.add(run_id)
    for _ in range(5):
        execute(database_url, "NOTIFY sync_trigger, 'block'")
    assert len(ids) == 1 and first not in ids
    [follow_up] = ids
    wait_until(
        lambda: runs(database_url, f"id = {follow_up} AND triggers = 10"),
        what="NOTIFY triggers coalesced into the pending run",
    )
    release(database_url)
    done = finished(database_url, 2)
    assert [(r["id"], r["status"]) for r in done] == [
        (first, "succeeded"),
        (follow_up, "succeeded"),
    ]
    assert done[1]["started_at"] >= done[0]["finished_at"]
    assert len(runs(database_url)) == 2


def test_on_overlap_skip_records_a_skipped_run(database_url, tmp_path, start):
    start(write_config(tmp_path / "c.toml", database_url, JOBS))
    query(database_url, "SELECT run_id FROM syncworker.trigger('skipper')")
    wait_until(lambda: runs(database_url, "status = 'running'"), what="run running")
    [(skipped_id,)] = query(database_url, "SELECT run_id FROM syncworker.trigger('skipper')")
    [skipped] = runs(database_url, f"id = {skipped_id}")
    assert skipped["status"] == "skipped"
    assert "on_overlap = skip" in skipped["error"]
    release(database_url)
    finished(database_url, 2)
    assert [r["status"] for r in runs(database_url)] == ["succeeded", "skipped"]


def test_bad_payloads_are_rejected_and_the_daemon_keeps_serving(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    bad = {
        "{not json": "invalid JSON",
        "[1, 2]": "must be an object",
        "nosuchjob": "unknown job",
        '{"job": "off"}': "disabled",
        '{"job": "sync", "scope": "XXX"}': "unknown scope",
        '{"job": "solo", "scope": "RIO"}': "has no scopes",
        '{"job": 5}': "non-empty string",
        '{"job": "sync", "scopes": "RIO"}': "list of strings",
        "'; DROP TABLE syncworker.runs; --": "neither JSON nor a job name",
        "x" * 7990: "neither JSON nor a job name",
    }
    for payload in bad:
        execute(database_url, "SELECT pg_notify('sync_trigger', %s)", (payload,))
    execute(database_url, "NOTIFY sync_trigger, 'solo'")
    finished(database_url, 1)
    rejected = daemon.events("trigger_rejected")
    assert len(rejected) == len(bad)
    for record, (payload, reason) in zip(rejected, bad.items(), strict=True):
        assert reason in record["reason"], (payload[:40], record["reason"])
    assert [r["job"] for r in runs(database_url)] == ["solo"]
    assert daemon.proc.poll() is None


def test_cron_fires_each_second_once_per_fire(database_url, tmp_path, start):
    jobs = """
[jobs.tick]
schedule = "* * * * * *"
scopes = ["a", "b"]
steps = ["sw_testjobs:record"]
"""
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs))
    daemon.wait_for("cron_fired", job="tick", count=3)
    done = finished(database_url, 4, "source = 'cron'")
    fires = {}
    for run in done:
        assert run["status"] == "succeeded"
        fires.setdefault(run["scheduled_for"], []).append(run["scope"])
    for scopes in fires.values():
        assert sorted(scopes) in (["a", "b"], ["a"], ["b"])
        assert len(scopes) == len(set(scopes))
    record = daemon.events("cron_fired")[0]
    assert record["late_ms"] < 1000 and record["missed"] is False
    [(next_fire,)] = query(
        database_url, "SELECT next_fire_at FROM syncworker.jobs WHERE name = 'tick'"
    )
    assert next_fire is not None


def _misfire_setup(url: str, tmp_path, policy: str) -> object:
    # Hourly, at the minute half an hour from now: the latest fire is about
    # 30 minutes old (well past the grace period) and the next far away.
    minute = (datetime.now(UTC).minute + 30) % 60
    jobs = f"""
[jobs.minutely]
schedule = "{minute} * * * *"
steps = ["sw_testjobs:record"]
misfire = "{policy}"
"""
    config = write_config(tmp_path / "c.toml", url, jobs)
    assert cli("migrate", "--config", str(config)).returncode == 0
    # As if the last worker went away ten minutes ago.
    execute(
        url,
        "UPDATE syncworker.jobs SET last_fire_at = now() - interval '3 hours'"
        " WHERE name = 'minutely'",
    )
    return config


def test_misfire_run_once_runs_the_latest_missed_fire_once(database_url, tmp_path, start):
    config = _misfire_setup(database_url, tmp_path, "run_once")
    started = datetime.now(UTC)
    daemon = start(config)
    record = daemon.wait_for("cron_fired", job="minutely")
    assert record["missed"] is True
    done = finished(database_url, 1)
    missed = [r for r in done if datetime.fromisoformat(r["scheduled_for"]) <= started]
    assert len(missed) == 1  # one run for three missed fires
    fire = datetime.fromisoformat(missed[0]["scheduled_for"])
    assert timedelta(minutes=25) < started - fire < timedelta(minutes=35)


def test_misfire_skip_runs_nothing_for_missed_fires(database_url, tmp_path, start):
    config = _misfire_setup(database_url, tmp_path, "skip")
    daemon = start(config)
    daemon.wait_for("misfire_skipped", job="minutely")
    started = datetime.now(UTC)
    assert [
        r for r in runs(database_url) if datetime.fromisoformat(r["scheduled_for"]) < started
    ] == []


def test_daemon_exempts_its_start_up_heap_from_full_collections(database_url, tmp_path, start):
    """`syncworker run` freezes what start-up built (syncworker.heap), so a
    full collection no longer walks it and cannot hold up a cron fire."""
    daemon = start(
        write_config(
            tmp_path / "c.toml", database_url, "[jobs.heap]\nsteps = ['sw_testjobs:heap']\n"
        )
    )
    frozen = daemon.wait_for("heap_frozen")
    # Start-up leaves some 60,000 objects: pydantic, psycopg, structlog, asyncio.
    assert frozen["objects"] > 50_000
    execute(database_url, "NOTIFY sync_trigger, 'heap'")
    [run] = finished(database_url, 1)
    assert run["status"] == "succeeded"
    # The step sees the heap still frozen: a few frozen objects have been
    # freed since (reference counting still frees them), none were added.
    assert 0.9 * frozen["objects"] < run["records_processed"] <= frozen["objects"]
