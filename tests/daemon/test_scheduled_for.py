"""ctx.scheduled_for (issue 16): the cron fire a run is for, None for a
trigger; the same in a process-isolated step and a command's environment."""

from __future__ import annotations

from datetime import datetime

from tests.harness import query, wait_until, write_config
from tests.invariants import trigger


def test_a_cron_run_knows_its_fire_and_a_triggered_one_does_not(database_url, tmp_path, start):
    out = tmp_path / "env"
    jobs = f"""
[jobs.tick]
schedule = "* * * * * *"
steps = ["sw_testjobs:scheduled"]

[jobs.child]
isolation = "process"
steps = ["sw_testjobs:scheduled"]

[jobs.shell]
steps = [{{ command = ["sh", "-c", "echo \\"$SYNCWORKER_SCHEDULED_FOR\\" >> {out}"] }}]
"""
    daemon = start(write_config(tmp_path / "c.toml", database_url, jobs))
    fired = daemon.wait_for("cron_fired", job="tick", timeout=10)
    [run_id] = fired["runs"]
    wait_until(
        lambda: query(database_url, "SELECT step FROM test_log WHERE run_id = %s", (run_id,)),
        what="the cron run's step",
    )
    [(seen,)] = query(database_url, "SELECT step FROM test_log WHERE run_id = %s", (run_id,))
    [(scheduled_for,)] = query(
        database_url, "SELECT scheduled_for FROM syncworker.runs WHERE id = %s", (run_id,)
    )
    assert datetime.fromisoformat(seen) == scheduled_for
    manual = trigger(database_url, "child")
    wait_until(
        lambda: query(database_url, "SELECT step FROM test_log WHERE run_id = %s", (manual,)),
        timeout=20,
        what="the process step",
    )
    assert query(database_url, "SELECT step FROM test_log WHERE run_id = %s", (manual,)) == [
        ("none",)
    ]
    shell = trigger(database_url, "shell")
    wait_until(
        lambda: (
            query(database_url, "SELECT status FROM syncworker.runs WHERE id = %s", (shell,))
            == [("succeeded",)]
        ),
        what="the command",
    )
    assert out.read_text() == "\n"  # empty for a trigger
    assert daemon.stop() == 0
