"""The command and SQL step contract, and scopes_sql, through real daemons.

Commands are small scripts written into the test's tmp_path: what they saw
(arguments, environment, signals, their own and their children's pids) they
write to files the test reads back.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from syncworker.command import KILL_GRACE
from tests.harness import cli, execute, query, wait_until, write_config

WAIT = 90.0  # generous: the machine running the suite is small and busy

PROBE = """\
import json, os, sys
out = sys.argv[1]
seen = {
    "argv": sys.argv[2:],
    "env": {k: v for k, v in os.environ.items() if k.startswith("SYNCWORKER_")},
}
with open(out + ".tmp", "w") as fh:
    json.dump(seen, fh)
os.replace(out + ".tmp", out)
"""

# A command with a child: `sleep` in the background, as a shell script would
# start a helper. $2 says what it does with SIGTERM: trap (record it and exit
# 0), ignore (so only SIGKILL ends it), or exit (return at once, leaving the
# child behind). The leader's pid file is written last: once it is there, the
# trap is in place and the child's pid is known.
GROUP = """\
#!/bin/sh
dir="$1"
case "$2" in
  trap) trap 'echo TERM >> "$dir/term.log"; exit 0' TERM ;;
  ignore) trap '' TERM ;;
esac
sleep 300 &
echo "$!" > "$dir/child.pid"
echo "$$" > "$dir/leader.tmp" && mv "$dir/leader.tmp" "$dir/leader.pid"
echo "started"
[ "$2" = exit ] && exit 0
wait
wait
"""


def toml(value: object) -> str:
    """A TOML value: JSON strings and arrays of them are valid TOML."""
    return json.dumps(value)


def runs(url: str, where: str = "true") -> list[dict]:
    rows = query(
        url,
        "SELECT coalesce(json_agg(r ORDER BY id), '[]') FROM syncworker.runs r WHERE " + where,
    )
    return rows[0][0]


def finished(url: str, count: int, where: str = "true", timeout: float = WAIT) -> list[dict]:
    return wait_until(
        lambda: (
            r
            if len(r := runs(url, where + " AND status NOT IN ('pending', 'running')")) >= count
            else None
        ),
        timeout=timeout,
        what=f"{count} finished runs where {where}",
    )


def steps_of(url: str, run_id: int) -> list[tuple]:
    return query(
        url,
        "SELECT status, error FROM syncworker.run_steps WHERE run_id = %s ORDER BY id",
        (run_id,),
    )


def gone(pid: int) -> bool:
    """No such process, or only its zombie (a dead child nobody reaped yet:
    PID 1 of a container may not reap the orphans it inherits)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.fixture
def group_script(tmp_path: Path) -> Iterator[Path]:
    """The GROUP script; whatever pids it recorded are killed at the end, so
    a failing test leaves no `sleep 300` behind."""
    script = tmp_path / "group.sh"
    script.write_text(GROUP)
    script.chmod(0o755)
    yield script
    for name in ("leader.pid", "child.pid"):
        for file in tmp_path.rglob(name):
            pid = int(file.read_text().strip() or 0)
            if pid and not gone(pid):
                os.kill(pid, signal.SIGKILL)


def pids_of(folder: Path) -> tuple[int, int]:
    wait_until(lambda: (folder / "leader.pid").exists(), timeout=WAIT, what="the command to start")
    return int((folder / "leader.pid").read_text()), int((folder / "child.pid").read_text())


# -- command steps ---------------------------------------------------------------------


def test_command_gets_its_environment_and_verbatim_arguments(database_url, tmp_path, start):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    hostile = f"x; touch {tmp_path}/pwned $(touch {tmp_path}/pwned2) `id` 'q' \"d\" | & > <"
    sneaky = "{job}-{run_id}"  # a scope that spells placeholders stays as it is
    outs = tmp_path / "out"
    outs.mkdir()
    command = [
        sys.executable,
        str(probe),
        f"{outs}/{{run_id}}.json",
        "{scope}",
        "{job}",
        "{run_id}",
        "pre-{scope}-{job}-post",
        "{unknown} {SCOPE} {{scope}}",
    ]
    jobs = f"""
[jobs.probe]
scopes = {toml([hostile, sneaky])}
steps = [{{ command = {toml(command)} }}]
"""
    start(write_config(tmp_path / "c.toml", database_url, jobs))
    trigger = {"job": "probe", "triggered_by": "hr-button", "source": "api", "k": [1, "é"]}
    execute(database_url, "SELECT pg_notify('sync_trigger', %s)", (json.dumps(trigger),))
    done = {r["scope"]: r for r in finished(database_url, 2)}

    for scope in (hostile, sneaky):
        run = done[scope]
        assert run["status"] == "succeeded", run
        rid = str(run["id"])
        seen = json.loads((outs / f"{rid}.json").read_text())
        assert seen["argv"] == [
            scope,
            "probe",
            rid,
            f"pre-{scope}-probe-post",
            "{unknown} {SCOPE} {" + scope + "}",
        ]
        # The worker's own environment is inherited (SYNCWORKER_LOG_FORMAT here).
        step_env = {k: v for k, v in seen["env"].items() if not k.startswith("SYNCWORKER_LOG_")}
        # The payload's file: the same JSON, gone once the step ended.
        payload_file = step_env.pop("SYNCWORKER_PAYLOAD_FILE")
        assert payload_file.endswith(".json") and not os.path.exists(payload_file)
        assert step_env == {
            "SYNCWORKER_RUN_ID": rid,
            "SYNCWORKER_JOB": "probe",
            "SYNCWORKER_SCOPE": scope,
            "SYNCWORKER_SOURCE": "api",
            "SYNCWORKER_TRIGGERED_BY": "hr-button",
            "SYNCWORKER_ATTEMPT": "1",
            "SYNCWORKER_SCHEDULED_FOR": "",  # a trigger's run, not a cron fire's
            "SYNCWORKER_PAYLOAD": json.dumps({"k": [1, "é"]}),
        }
    # No shell ever saw the scope.
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


def test_command_output_becomes_log_events_and_counter_lines_count(database_url, tmp_path, start):
    script = tmp_path / "count.sh"
    script.write_text(
        """#!/bin/sh
echo "fetching page 1"
echo '::syncworker {"inserted": 10, "total": 500}'
echo "a warning on stderr" >&2
echo '::syncworker {"updated": 5, "errored": 1}'
echo '::syncworker {"inserted": 2'
echo '::syncworker {"inserted": 1, "bogus": 3}'
echo '::syncworker {"inserted": -4}'
echo '::syncworker {"deleted": 1.5}'
echo '::syncworker ["inserted", 1]'
echo '::syncworker'
head -c 100000 /dev/zero | tr '\\0' 'y'
echo
echo '::syncworker {"deleted": 3}'
printf 'no newline at the end'
"""
    )
    script.chmod(0o755)
    jobs = f"""
[jobs.counted]
steps = [{{ command = {toml([str(script)])} }}]
"""
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs))
    execute(database_url, "NOTIFY sync_trigger, 'counted'")
    [run] = finished(database_url, 1)
    assert run["status"] == "succeeded", run
    assert run["records_total"] == 500
    assert (run["records_inserted"], run["records_updated"], run["records_deleted"]) == (10, 5, 3)
    assert run["records_errored"] == 1
    # inserted, updated and deleted also count as processed.
    assert run["records_processed"] == 18
    [(step_total, step_processed)] = query(
        database_url,
        "SELECT records_total, records_processed FROM syncworker.run_steps WHERE run_id = %s",
        (run["id"],),
    )
    assert (step_total, step_processed) == (500, 18)

    daemon.wait_for("run_succeeded", run_id=run["id"])
    lines = [(r["stream"], r["line"]) for r in daemon.events("step_output", run_id=run["id"])]
    assert ("stdout", "fetching page 1") in lines
    assert ("stderr", "a warning on stderr") in lines
    assert ("stdout", "no newline at the end") in lines
    assert not [line for _, line in lines if line.startswith("::syncworker")]
    [long] = daemon.events("step_output", run_id=run["id"], truncated=True)
    assert long["line"] == "y" * 8192
    ignored = daemon.events("step_counter_line_ignored", run_id=run["id"])
    assert [r["level"] for r in ignored] == ["warning"] * 6
    reasons = [r["reason"] for r in ignored]
    assert reasons[0].startswith("not JSON")
    assert "unknown counter 'bogus'" in reasons[1]
    assert "whole number" in reasons[2] and "whole number" in reasons[3]
    assert reasons[4] == "not a JSON object"
    assert reasons[5].startswith("not JSON")  # the bare prefix
    assert daemon.events("step_output", run_id=run["id"], job="counted", scope=None)


def test_command_failure_records_exit_code_and_stderr_tail(database_url, tmp_path, start):
    script = tmp_path / "fail.sh"
    script.write_text(
        """#!/bin/sh
echo "progress on stdout"
i=1
while [ $i -le 30 ]; do echo "problem $i" >&2; i=$((i + 1)); done
exit 3
"""
    )
    script.chmod(0o755)
    jobs = f"""
[jobs.failing]
steps = [{{ command = {toml([str(script)])} }}, "sw_testjobs:second"]

[jobs.missing]
steps = [{{ command = ["{tmp_path}/no-such-program", "x"] }}]
"""
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs))
    execute(database_url, "NOTIFY sync_trigger, 'failing'")
    execute(database_url, "NOTIFY sync_trigger, 'missing'")
    done = {r["job"]: r for r in finished(database_url, 2)}

    failing = done["failing"]
    assert failing["status"] == "failed"
    expected = "exit code 3: " + "\n".join(f"problem {i}" for i in range(11, 31))
    assert failing["error"] == expected
    # The failed step stops the job: the next step never started.
    assert steps_of(database_url, failing["id"]) == [("failed", expected)]
    daemon.wait_for("run_failed", run_id=failing["id"], error=expected)

    missing = done["missing"]
    assert missing["status"] == "failed"
    assert missing["error"] == (
        f"cannot start '{tmp_path}/no-such-program': No such file or directory"
    )


def test_command_leaving_a_child_behind_ends_the_step_and_the_child(
    database_url, tmp_path, start, group_script
):
    """The background child holds the output pipes open: the step must not
    wait for it, and must not leave it running either."""
    jobs = f"""
[jobs.leaver]
steps = [{{ command = {toml([str(group_script), str(tmp_path), "exit"])} }}]
"""
    start(write_config(tmp_path / "c.toml", database_url, jobs))
    execute(database_url, "NOTIFY sync_trigger, 'leaver'")
    [run] = finished(database_url, 1)
    assert run["status"] == "succeeded", run
    assert run["duration_ms"] < 60_000  # not the child's 300 s
    leader, child = pids_of(tmp_path)
    wait_until(lambda: gone(leader) and gone(child), timeout=WAIT, what="no process left")


@pytest.mark.parametrize("mode", ["trap", "ignore"])
def test_command_timeout_terminates_then_kills_the_whole_group(
    database_url, tmp_path, start, group_script, mode
):
    jobs = f"""
[jobs.slow]
steps = [{{ command = {toml([str(group_script), str(tmp_path), mode])} }}]
timeout = 3
"""
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs))
    execute(database_url, "NOTIFY sync_trigger, 'slow'")
    leader, child = pids_of(tmp_path)
    [run] = finished(database_url, 1)
    assert run["status"] == "failed"
    assert run["error"] == "timed out after 3 s"
    wait_until(lambda: gone(leader) and gone(child), timeout=WAIT, what="the group gone")
    if mode == "trap":
        # SIGTERM first: the command could clean up and went before the grace.
        assert (tmp_path / "term.log").read_text() == "TERM\n"
        assert run["duration_ms"] < (3 + KILL_GRACE) * 1000
    else:
        # It ignored SIGTERM: SIGKILL came after the grace.
        assert run["duration_ms"] >= (3 + KILL_GRACE) * 1000 - 200
    assert daemon.proc.poll() is None


def test_drain_terminates_a_command_and_requeues_its_run(
    database_url, tmp_path, start, group_script
):
    jobs = f"""
[jobs.cmd]
steps = [{{ command = {toml([str(group_script), str(tmp_path), "trap"])} }}]
"""
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs, drain_timeout=120))
    [(run_id,)] = query(database_url, "SELECT run_id FROM syncworker.trigger('cmd')")
    leader, child = pids_of(tmp_path)
    daemon.signal(signal.SIGTERM)
    # It exits well before the drain timeout: the command ended on SIGTERM.
    assert daemon.wait_exit(timeout=WAIT) == 0
    assert (tmp_path / "term.log").read_text() == "TERM\n"
    wait_until(lambda: gone(leader) and gone(child), timeout=WAIT, what="the group gone")
    # The drain rule: a step stopped by the drain is redone, never failed.
    assert runs(database_url, f"id = {run_id}")[0]["status"] == "pending"
    assert steps_of(database_url, run_id) == [("cancelled", "stopped by shutdown")]
    assert not daemon.events("drain_cancelling")


def test_drain_kills_a_command_ignoring_sigterm_after_drain_timeout(
    database_url, tmp_path, start, group_script
):
    jobs = f"""
[jobs.cmd]
steps = [{{ command = {toml([str(group_script), str(tmp_path), "ignore"])} }}]
"""
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs, drain_timeout=2))
    [(run_id,)] = query(database_url, "SELECT run_id FROM syncworker.trigger('cmd')")
    leader, child = pids_of(tmp_path)
    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=WAIT) == 0
    assert time.monotonic() - began >= 2 - 0.2  # SIGTERM alone did not end it
    daemon.wait_for("drain_cancelling")
    wait_until(lambda: gone(leader) and gone(child), timeout=WAIT, what="the group gone")
    assert runs(database_url, f"id = {run_id}")[0]["status"] == "pending"


# -- SQL steps -------------------------------------------------------------------------

SQL_TABLES = """
CREATE TABLE sql_log (
    id serial PRIMARY KEY, job text, scope text, run_id bigint, payload jsonb,
    note text UNIQUE);
CREATE TABLE sql_totals (scope text PRIMARY KEY, n int NOT NULL DEFAULT 0);
"""


def test_sql_step_runs_with_parameters_and_counts_changed_rows(database_url, tmp_path, start):
    execute(database_url, SQL_TABLES)
    sql = """
INSERT INTO sql_log (job, scope, run_id, payload, note)
    VALUES (%(job)s, %(scope)s, %(run_id)s, %(payload)s, 'first ' || %(scope)s);
INSERT INTO sql_log (job, scope, run_id, note)
    SELECT %(job)s, %(scope)s, %(run_id)s, 'row ' || %(scope)s || ' ' || i
    FROM generate_series(1, 4) AS i;
UPDATE sql_log SET note = note || ' (100%%)' WHERE scope = %(scope)s AND note LIKE 'row %%';
SELECT count(*) FROM sql_log
"""
    jobs = f"""
[jobs.sqljob]
scopes = {toml(["O'Brien; DROP TABLE sql_log; --", "plain"])}
steps = [{{ sql = {toml(sql)} }}]
"""
    start(write_config(tmp_path / "c.toml", database_url, jobs))
    execute(
        database_url,
        "SELECT pg_notify('sync_trigger', %s)",
        (json.dumps({"job": "sqljob", "scope": "O'Brien; DROP TABLE sql_log; --", "n": 7}),),
    )
    [run] = finished(database_url, 1)
    assert run["status"] == "succeeded", run
    # 1 + 4 inserted, 4 updated; the closing SELECT's row is not work done.
    assert run["records_processed"] == 9
    rows = query(database_url, "SELECT job, scope, run_id, payload, note FROM sql_log ORDER BY id")
    scope = "O'Brien; DROP TABLE sql_log; --"
    assert rows[0] == ("sqljob", scope, run["id"], {"n": 7}, f"first {scope}")
    assert [r[4] for r in rows[1:]] == [f"row {scope} {i} (100%)" for i in range(1, 5)]


def test_sql_step_failure_rolls_back_and_records_the_database_message(
    database_url, tmp_path, start
):
    execute(database_url, SQL_TABLES)
    execute(database_url, "INSERT INTO sql_log (note) VALUES ('taken')")
    sql = """
INSERT INTO sql_totals (scope) VALUES (%(scope)s);
INSERT INTO sql_log (note) VALUES ('mine'), ('taken');
"""
    jobs = f"""
[jobs.broken]
scopes = ["a"]
steps = [{{ sql = {toml(sql)} }}, "sw_testjobs:second"]
retries = 1
retry_backoff = 0.1

[jobs.typo]
steps = [{{ sql = "SELEC 1" }}]
"""
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs))
    execute(database_url, "NOTIFY sync_trigger, 'broken'")
    execute(database_url, "NOTIFY sync_trigger, 'typo'")
    done = {r["job"]: r for r in finished(database_url, 2)}

    broken = done["broken"]
    assert broken["status"] == "failed" and broken["attempt"] == 2
    assert broken["error"] == (
        'duplicate key value violates unique constraint "sql_log_note_key" (SQLSTATE 23505)\n'
        "DETAIL: Key (note)=(taken) already exists."
    )
    assert broken["records_processed"] == 0
    # Nothing half-written: the first INSERT went with the second.
    assert query(database_url, "SELECT count(*) FROM sql_totals") == [(0,)]
    assert query(database_url, "SELECT note FROM sql_log") == [("taken",)]
    assert [s for s, _ in steps_of(database_url, broken["id"])] == ["failed", "failed"]
    # Told in its own words, without a Python traceback.
    failed = daemon.wait_for("attempt_failed", run_id=broken["id"])
    assert "exception" not in failed

    assert done["typo"]["status"] == "failed"
    assert done["typo"]["error"] == 'syntax error at or near "SELEC" (SQLSTATE 42601)'


# -- scopes_sql ------------------------------------------------------------------------


def test_scopes_sql_is_refreshed_at_each_fire_and_validates_triggers(database_url, tmp_path, start):
    execute(
        database_url,
        "CREATE TABLE orgs (code text PRIMARY KEY, active bool NOT NULL DEFAULT true);"
        "INSERT INTO orgs VALUES ('RIO', true), ('HOU', true), ('OLD', false)",
    )
    jobs = """
[jobs.orgsync]
schedule = "* * * * * *"
scopes_sql = "SELECT code FROM orgs WHERE active ORDER BY code"
steps = [{ sql = "SELECT 1" }]
"""
    config = write_config(tmp_path / "c.toml", database_url, jobs)
    # migrate computes the scopes too, so trigger() knows them before any worker.
    assert cli("migrate", "--config", str(config)).returncode == 0
    assert query(database_url, "SELECT scopes FROM syncworker.jobs") == [(["HOU", "RIO"],)]

    def reject(scope: str, count: int) -> None:
        payload = json.dumps({"job": "orgsync", "scope": scope})
        execute(database_url, "SELECT pg_notify('sync_trigger', %s)", (payload,))
        record = daemon.wait_for("trigger_rejected", count=count, timeout=WAIT)
        assert record["reason"] == f"unknown scope '{scope}' for job 'orgsync'"

    def accept(scope: str) -> None:
        payload = json.dumps({"job": "orgsync", "scope": scope, "source": "button"})
        execute(database_url, "SELECT pg_notify('sync_trigger', %s)", (payload,))
        finished(database_url, 1, f"source = 'button' AND scope = '{scope}'")

    daemon = start(config)
    reject("NEW", 1)

    execute(database_url, "INSERT INTO orgs VALUES ('NEW')")
    daemon.wait_for("scopes_changed", job="orgsync", scopes=["HOU", "NEW", "RIO"], timeout=WAIT)
    finished(database_url, 1, "source = 'cron' AND scope = 'NEW'")
    accept("NEW")
    query(database_url, "SELECT * FROM syncworker.trigger('orgsync', 'NEW')")

    execute(database_url, "UPDATE orgs SET active = false WHERE code = 'RIO'")
    daemon.wait_for("scopes_changed", job="orgsync", scopes=["HOU", "NEW"], timeout=WAIT)
    reject("RIO", 2)
    wait_until(
        lambda: query(database_url, "SELECT scopes FROM syncworker.jobs") == [(["HOU", "NEW"],)],
        timeout=WAIT,
        what="trigger() to know the new scopes",
    )
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="RIO"):
        query(database_url, "SELECT * FROM syncworker.trigger('orgsync', 'RIO')")

    # A query that breaks keeps the scopes known so far, and the daemon serving.
    execute(database_url, "ALTER TABLE orgs RENAME TO orgs_gone")
    failed = daemon.wait_for("scopes_sql_failed", job="orgsync", timeout=WAIT)
    assert 'relation "orgs" does not exist' in failed["error"]
    assert failed["kept"] == ["HOU", "NEW"]
    [(last,)] = query(database_url, "SELECT max(id) FROM syncworker.runs")
    finished(database_url, 1, f"source = 'cron' AND scope = 'HOU' AND id > {last}")
    assert daemon.proc.poll() is None
    execute(database_url, "ALTER TABLE orgs_gone RENAME TO orgs")
    accept("HOU")


def test_a_scopes_sql_the_database_refuses_is_a_config_error(database_url, tmp_path, start):
    jobs = """
[jobs.orgsync]
scopes_sql = "SELECT code FROM no_such_orgs"
steps = [{ sql = "SELECT 1" }]
"""
    config = write_config(tmp_path / "c.toml", database_url, jobs)
    expected = (
        f"config error: {config}: jobs.orgsync.scopes_sql: the query failed:"
        ' relation "no_such_orgs" does not exist'
    )
    migrated = cli("migrate", "--config", str(config))
    assert (migrated.returncode, migrated.stderr.strip()) == (78, f"syncworker: {expected}")
    daemon = start(config, wait_ready=False)
    assert daemon.wait_exit(timeout=WAIT) == 78
    assert f"syncworker: {expected}\n" in daemon.log_text()
