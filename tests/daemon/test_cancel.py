"""Cancel (issue 16; SPEC "Operating it"), with real daemons: a cooperative
step stops within a second, a Python step that ignores ctx.stopping and a
command that ignores SIGTERM within cancel_grace + 1 s (its process group
gone); the run ends `cancelled`, not retried, with who and why; a pending
run is cancelled at once; a finished run is left alone; a forged wake stops
nothing; and a run whose owner is killed right after the cancel is not
brought back by orphan recovery."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.harness import cli, execute, query, wait_until, write_config
from tests.invariants import assert_invariants, trigger

GRACE = 2.0


def jobs(tmp_path: Path) -> str:
    pidfile = tmp_path / "pids"
    pidfile.mkdir(exist_ok=True)
    return f"""
[jobs.coop]
steps = ["sw_testjobs:cooperative"]
retries = 3

[jobs.stubborn]
steps = ["sw_testjobs:slow"]
retries = 3

[jobs.command]
steps = [{{ command = ["sh", "-c", "trap '' TERM; echo $$ > {pidfile}/$SYNCWORKER_RUN_ID; sleep 600"] }}]
retries = 3
"""


def row(url: str, run_id: int) -> tuple[str, str | None, int]:
    [r] = query(url, "SELECT status, error, attempt FROM syncworker.runs WHERE id = %s", (run_id,))
    return r


def cancel(url: str, run_id: int, reason: str = "wrong window") -> str:
    [(status,)] = query(url, "SELECT syncworker.cancel(%s, %s)", (run_id, reason))
    return str(status)


def ran(url: str, run_id: int, step: str) -> int:
    [(n,)] = query(
        url, "SELECT count(*) FROM test_log WHERE run_id = %s AND step = %s", (run_id, step)
    )
    return int(n)


def test_a_cooperative_step_stops_within_a_second(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs(tmp_path)))
    run_id = trigger(database_url, "coop")
    daemon.wait_for("run_started", run_id=run_id)
    wait_until(lambda: ran(database_url, run_id, "cooperative") == 1, what="the step going")
    began = time.monotonic()
    assert cancel(database_url, run_id) == "running"
    wait_until(lambda: row(database_url, run_id)[0] == "cancelled", timeout=5, what="cancelled")
    assert time.monotonic() - began < 1.0
    assert ran(database_url, run_id, "stopped early") == 1
    [(me,)] = query(database_url, "SELECT session_user::text")
    assert row(database_url, run_id) == ("cancelled", f"cancelled by {me}: wrong window", 1)
    time.sleep(0.5)
    assert row(database_url, run_id)[0] == "cancelled"  # not retried
    assert daemon.events("run_retrying") == []
    assert daemon.stop() == 0
    assert_invariants(database_url)


def test_a_step_that_ignores_stopping_is_cancelled_after_the_grace(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, jobs(tmp_path), cancel_grace=GRACE)
    daemon = start(config)
    run_id = trigger(database_url, "stubborn", None, seconds=600)
    wait_until(lambda: ran(database_url, run_id, "slow") == 1, what="the step going")
    began = time.monotonic()
    done = cli("cancel", str(run_id), "--reason", "wrong window", "--config", str(config))
    assert (done.returncode, done.stdout.strip()) == (0, f"run {run_id}: its worker is stopping it")
    wait_until(lambda: row(database_url, run_id)[0] == "cancelled", timeout=10, what="cancelled")
    took = time.monotonic() - began
    assert GRACE - 0.2 < took < GRACE + 1.0, took
    assert daemon.events("run_cancel_requested", run_id=run_id)
    assert daemon.stop() == 0


def test_a_command_that_ignores_sigterm_is_killed_with_its_group(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, jobs(tmp_path), cancel_grace=GRACE)
    daemon = start(config)
    run_id = trigger(database_url, "command")
    pidfile = tmp_path / "pids" / str(run_id)
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the command up")
    pgid = int(pidfile.read_text())
    began = time.monotonic()
    assert cancel(database_url, run_id) == "running"

    def group_gone() -> bool:
        """No process of the group left that is not a zombie (a zombie
        executes nothing; reaping it is its new parent's business)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return False
        return True

    wait_until(group_gone, timeout=10, what="the command's process group gone")
    assert time.monotonic() - began < GRACE + 1.0
    wait_until(lambda: row(database_url, run_id)[0] == "cancelled", timeout=5, what="cancelled")
    assert daemon.stop() == 0


def test_a_pending_run_is_cancelled_at_once_and_never_runs(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs(tmp_path)))
    execute(database_url, "SELECT syncworker.pause('coop')")  # keeps the run pending
    run_id = trigger(database_url, "coop")
    assert cancel(database_url, run_id, "not needed") == "cancelled"
    execute(database_url, "SELECT syncworker.resume('coop')")
    time.sleep(1.0)
    assert row(database_url, run_id)[0] == "cancelled"
    assert ran(database_url, run_id, "cooperative") == 0
    # Cancelling it again, or a finished run, changes nothing.
    assert cancel(database_url, run_id) == "cancelled"
    [(actions,)] = query(
        database_url, "SELECT count(*) FROM syncworker.actions WHERE action = 'cancel'"
    )
    assert actions == 1
    assert daemon.stop() == 0


def test_bad_and_idle_cancels(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, jobs(tmp_path))
    daemon = start(config)
    unknown = cli("cancel", "999999", "--config", str(config))
    assert unknown.returncode == 1 and "unknown run 999999" in unknown.stderr, unknown.stderr
    assert "Traceback" not in unknown.stderr
    run_id = trigger(database_url, "stubborn", None, seconds=0)
    wait_until(lambda: row(database_url, run_id)[0] == "succeeded", what="the run done")
    done = cli("cancel", str(run_id), "--config", str(config))
    assert done.stdout.strip() == f"run {run_id} had ended (succeeded): nothing changed"
    assert row(database_url, run_id)[0] == "succeeded"
    assert query(database_url, "SELECT count(*) FROM syncworker.actions") == [(0,)]
    assert daemon.stop() == 0


def test_a_forged_cancel_wake_stops_nothing(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs(tmp_path)))
    run_id = trigger(database_url, "stubborn", None, seconds=1.5)
    wait_until(lambda: ran(database_url, run_id, "slow") == 1, what="the step going")
    execute(database_url, "SELECT pg_notify('syncworker_wake', %s)", (f'{{"cancel": {run_id}}}',))
    wait_until(lambda: row(database_url, run_id)[0] == "succeeded", timeout=10, what="done")
    assert daemon.events("run_cancel_requested") == []
    assert daemon.stop() == 0


def test_a_cancelled_run_is_not_resurrected_when_its_owner_dies(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, jobs(tmp_path), cancel_grace=30)
    owner = start(config)
    run_id = trigger(database_url, "stubborn", None, seconds=600)
    wait_until(lambda: ran(database_url, run_id, "slow") == 1, what="the step going")
    peer = start(config)
    assert cancel(database_url, run_id) == "running"
    owner.signal(signal.SIGKILL)
    owner.wait_exit(10)
    wait_until(lambda: row(database_url, run_id)[0] == "cancelled", timeout=15, what="cancelled")
    [(me,)] = query(database_url, "SELECT session_user::text")
    assert row(database_url, run_id)[1] == f"cancelled by {me}: wrong window"
    assert peer.events("run_recovered", run_id=run_id, status="cancelled")
    time.sleep(1.0)
    assert ran(database_url, run_id, "slow") == 1  # never run again
    assert peer.stop() == 0
