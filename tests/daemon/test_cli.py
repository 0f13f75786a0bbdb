"""The CLI, the SQL function and the Python API, as users call them."""

from __future__ import annotations

import asyncio
import json
import sys

import psycopg
import pytest

import syncworker
from syncworker.embedded import free_port
from tests.harness import REPO, cli, query, release, write_config

JOBS = """
[jobs.sync]
scopes = ["RIO", "HOU"]
schedule = "0 3 * * *"
timezone = "America/Sao_Paulo"
steps = ["sw_testjobs:record"]

[jobs.block]
steps = ["sw_testjobs:wait_release"]

[jobs.off]
steps = ["sw_testjobs:record"]
enabled = false
"""


def test_migrate_is_idempotent_and_registers_jobs(database_url, tmp_path):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    first = cli("migrate", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert "migrations applied: 1" in first.stdout
    second = cli("migrate", "--config", str(config))
    assert second.returncode == 0 and "up to date" in second.stdout
    rows = query(database_url, "SELECT name, enabled, scopes FROM syncworker.jobs ORDER BY name")
    assert rows == [("block", True, None), ("off", False, None), ("sync", True, ["RIO", "HOU"])]


def test_sql_trigger_function_validates_and_coalesces(database_url, tmp_path):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0
    rows = query(database_url, "SELECT * FROM syncworker.trigger('sync')")
    assert [created for _, created in rows] == [True, True]
    again = query(database_url, "SELECT * FROM syncworker.trigger('sync', scope => 'RIO')")
    assert again == [(rows[0][0], False)]  # joined the pending RIO run
    [(triggers,)] = query(
        database_url, "SELECT triggers FROM syncworker.runs WHERE id = %s", (rows[0][0],)
    )
    assert triggers == 2
    for sql, message in [
        ("SELECT * FROM syncworker.trigger('nope')", "unknown job 'nope'"),
        ("SELECT * FROM syncworker.trigger('off')", "job 'off' is disabled"),
        ("SELECT * FROM syncworker.trigger('sync', scope => 'XX')", "unknown scope 'XX'"),
        ("SELECT * FROM syncworker.trigger('block', scope => 'XX')", "has no scopes"),
        ("SELECT * FROM syncworker.trigger('block', payload => '[1]')", "must be a JSON object"),
    ]:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
            query(database_url, sql)
    assert len(query(database_url, "SELECT id FROM syncworker.runs")) == 2  # nothing half-written


def test_durable_trigger_made_while_no_worker_runs(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0
    made = cli(
        "trigger", "sync", "--scope", "HOU", "--by", "ops", "--json", "--config", str(config)
    )
    assert made.returncode == 0, made.stderr
    [run_id] = json.loads(made.stdout)["runs"]
    start(config)
    waited = cli("trigger", "sync", "--scope", "HOU", "--wait", "--json", "--config", str(config))
    assert waited.returncode == 0, waited.stderr
    rows = query(
        database_url,
        "SELECT status, triggered_by, source FROM syncworker.runs WHERE id = %s",
        (run_id,),
    )
    assert rows == [("succeeded", "ops", "cli")]
    assert [r["status"] for r in json.loads(waited.stdout)["runs"]] == ["succeeded"]


def test_trigger_wait_exit_codes(database_url, tmp_path, start):
    jobs = (
        JOBS
        + """
[jobs.bad]
scopes = ["BAD"]
steps = ["sw_testjobs:record"]
"""
    )
    # Two at once: the blocked run must not hold up the failing one.
    config = write_config(tmp_path / "c.toml", database_url, jobs, concurrency=2)
    assert cli("migrate", "--config", str(config)).returncode == 0
    # Nobody serves the run yet: --wait gives up with exit 2.
    timed_out = cli("trigger", "block", "--wait", "--timeout", "1", "--config", str(config))
    assert timed_out.returncode == 2, timed_out.stderr
    assert "timed out" in timed_out.stderr
    start(config)
    failed = cli("trigger", "bad", "--wait", "--config", str(config))
    assert failed.returncode == 1
    assert "bad/BAD: failed 10/10 (RuntimeError: scope BAD is broken)" in failed.stderr
    unknown = cli("trigger", "nope", "--config", str(config))
    assert unknown.returncode == 1 and "unknown job 'nope'" in unknown.stderr
    release(database_url)
    ok = cli("trigger", "block", "--wait", "--config", str(config))
    assert ok.returncode == 0, ok.stderr


def test_status_json_and_table(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    start(config)
    assert cli("trigger", "sync", "--wait", "--config", str(config)).returncode == 0
    out = cli("status", "--json", "--config", str(config))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"workers", "jobs", "runs", "summary", "actions"}
    assert data["summary"]["total"] == 2 and data["summary"]["succeeded"] == 2
    assert data["summary"]["last_success_at"]
    [worker] = data["workers"]
    assert worker["state"] == "idle" and worker["pid"] > 0 and worker["heartbeat_at"]
    sync = next(j for j in data["jobs"] if j["name"] == "sync")
    assert sync["next_fire_at"] and sync["last_status"] == "succeeded"
    assert {r["scope"] for r in data["runs"]} == {"RIO", "HOU"}
    assert {"records_processed", "duration_ms", "status", "job"} <= set(data["runs"][0])
    limited = json.loads(cli("status", "--json", "--limit", "1", "--config", str(config)).stdout)
    assert len(limited["runs"]) == 1
    table = cli("status", "--config", str(config))
    assert table.returncode == 0
    for heading in ("WORKERS", "JOBS", "RECENT RUNS", "succeeded 2"):
        assert heading in table.stdout


def test_check_validates_and_reports_the_database(database_url, tmp_path):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    ok = cli("check", "--config", str(config))
    assert ok.returncode == 0, ok.stderr
    assert "fires 20" in ok.stdout and "database: reachable" in ok.stdout
    down = write_config(
        tmp_path / "down.toml", f"postgresql://nobody:secret@127.0.0.1:{free_port()}/x", JOBS
    )
    unreachable = cli("check", "--config", str(down))
    assert unreachable.returncode == 69
    assert "secret" not in unreachable.stderr + unreachable.stdout
    bad_step = write_config(
        tmp_path / "bad.toml", database_url, '[jobs.x]\nsteps = ["sw_testjobs:no_such_step"]\n'
    )
    result = cli("check", "--config", str(bad_step))
    assert result.returncode == 78
    assert "jobs.x.steps[0]" in result.stderr and "no_such_step" in result.stderr


def test_run_exits_78_on_a_config_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[jobs.x]\nsteps = ["a:b"]\nschedule = "every day"\n')
    result = cli("run", "--config", str(bad))
    assert result.returncode == 78
    assert "jobs.x.schedule" in result.stderr


def test_python_api_triggers_and_reports_errors(database_url, tmp_path):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0

    async def call() -> list[int]:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            made = await syncworker.trigger_sync(conn, "sync", scope="RIO", source="webhook")
            with pytest.raises(syncworker.TriggerError, match="unknown scope 'XX'"):
                await syncworker.trigger_sync(conn, "sync", scope="XX")
            return made

    ids = asyncio.run(call())
    assert len(ids) == 1
    with psycopg.connect(database_url) as conn:  # not autocommit: joins the transaction
        both = syncworker.trigger_sync_blocking(conn, "sync", payload={"k": 1})
        conn.rollback()
    assert ids[0] in both
    rows = query(database_url, "SELECT scope, source, payload FROM syncworker.runs ORDER BY id")
    assert rows == [("RIO", "webhook", {})]  # the rolled-back HOU run is gone


@pytest.mark.parametrize(
    "args",
    [
        ["trigger", "sync"],
        ["trigger", "sync", "--wait", "--json"],
        ["status"],
        ["status", "--json"],
    ],
    ids=" ".join,
)
def test_a_database_without_the_schema_exits_78_with_the_migrate_hint(database_url, args):
    result = cli(*args, "--database-url", database_url)
    assert result.returncode == 78, result.stderr
    assert result.stderr == (
        f"syncworker: schema 'syncworker' is not set up: run `{sys.executable.rsplit('/', 1)[-1]}"
        " -m syncworker migrate`\n"
    )
    assert result.stdout == ""


def test_trigger_wait_json_and_status_json_print_the_same_timestamps(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    start(config)
    # A session TimeZone other than UTC must not change what is printed.
    env = {"PGTZ": "America/Sao_Paulo"}
    waited = cli(
        "trigger", "sync", "--scope", "RIO", "--wait", "--json", "--config", str(config), env=env
    )
    assert waited.returncode == 0, waited.stderr
    [run] = json.loads(waited.stdout)["runs"]
    status = json.loads(cli("status", "--json", "--config", str(config), env=env).stdout)
    [listed] = [r for r in status["runs"] if r["id"] == run["id"]]
    for key in ("requested_at", "started_at", "finished_at"):
        assert run[key] == listed[key], key
        assert run[key].endswith("Z") and "T" in run[key], run[key]


def test_check_on_the_example_says_pythonpath_is_what_is_missing(database_url):
    example = REPO / "examples" / "hello" / "syncworker.toml"
    args = ("check", "--config", str(example), "--database-url", database_url)
    missing = cli(*args, env={"PYTHONPATH": ""})
    assert missing.returncode == 78
    assert "cannot import 'hello_sync'" in missing.stderr
    assert "put its directory on PYTHONPATH; PYTHONPATH is unset" in missing.stderr
    assert "Traceback" not in missing.stderr
    found = cli(*args, env={"PYTHONPATH": str(REPO / "examples" / "hello")})
    assert found.returncode == 0, found.stderr
    assert "config: ok" in found.stdout
