"""Execution exclusion for step runtimes (issue 12), with real daemons:

- a plain function whose run is given up on keeps its slot until its thread ends;
- `isolation = "process"` runs a step in a child the worker kills;
- an async step that swallows CancelledError is abandoned, its run requeued,
  and the worker exits 70 for its supervisor to restart;
- sys.exit() in a step fails the step; os._exit(0) never ends the worker with 0.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from tests.harness import execute, query, wait_until, write_config

SPAN_SQL = """
CREATE TABLE IF NOT EXISTS step_span (
    id bigserial PRIMARY KEY, run_id bigint, pid int, what text,
    at timestamptz DEFAULT clock_timestamp());
"""


@pytest.fixture
def url(database_url: str) -> str:
    execute(database_url, SPAN_SQL)
    return database_url


def trigger(
    url: str, job: str, payload: dict[str, Any] | None = None, scope: str | None = None
) -> int:
    [(run_id,)] = query(
        url,
        "SELECT run_id FROM syncworker.trigger(%s, %s, payload => %s)",
        (job, scope, Jsonb(payload or {})),
    )
    return int(run_id)


def status_of(url: str, run_id: int) -> str:
    return str(query(url, "SELECT status FROM syncworker.runs WHERE id = %s", (run_id,))[0][0])


def spans(url: str, run_id: int | None = None) -> list[tuple[int, int, str, Any]]:
    where = "" if run_id is None else f"WHERE run_id = {int(run_id)}"
    return query(url, f"SELECT run_id, pid, what, at FROM step_span {where} ORDER BY id")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose: it executes nothing.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- a plain function keeps its slot until its thread ends -------------------------------

PLAIN = """
[jobs.blocking]
scopes = ["a", "b"]
timeout = 0.5
steps = ["sw_stepjobs:blocking_span"]
"""


def test_timed_out_thread_keeps_its_slot(url, tmp_path, start):
    notes = tmp_path / "notes.jsonl"
    daemon = start(write_config(tmp_path / "c.toml", url, PLAIN, concurrency=1))
    first = trigger(url, "blocking", {"file": str(notes), "seconds": 3}, scope="a")
    second = trigger(url, "blocking", {"file": str(notes), "seconds": 0.2}, scope="b")
    abandoned = daemon.wait_for("step_abandoned", run_id=first)
    assert abandoned["reason"] == "timeout"
    assert abandoned["runtime"] == "thread"
    assert abandoned["job"] == "blocking"
    assert abandoned["step"] == "sw_stepjobs:blocking_span"
    # The outcome is written at once, while the thread still runs.
    wait_until(lambda: status_of(url, first) == "failed", timeout=5, what="first run failed")
    assert status_of(url, second) == "pending"
    daemon.wait_for("abandoned_step_ended", run_id=first, timeout=10)
    wait_until(lambda: status_of(url, second) == "succeeded", timeout=10, what="second run")
    lines = [json.loads(line) for line in notes.read_text().splitlines()]
    times = {(n["run_id"], n["what"]): n["at"] for n in lines}
    # concurrency = 1: the second step began only after the first thread ended.
    assert times[(first, "end")] <= times[(second, "start")]
    daemon.stop()


def test_a_retry_waits_for_the_abandoned_thread(url, tmp_path, start):
    notes = tmp_path / "notes.jsonl"
    jobs = PLAIN + "retries = 1\nretry_backoff = 0\n"
    daemon = start(write_config(tmp_path / "c.toml", url, jobs, concurrency=2))
    run_id = trigger(url, "blocking", {"file": str(notes), "seconds": 1.5}, scope="a")
    daemon.wait_for("retry_waiting", run_id=run_id)
    wait_until(lambda: status_of(url, run_id) == "failed", timeout=15, what="both attempts")
    lines = [json.loads(line) for line in notes.read_text().splitlines()]
    times = {(n["attempt"], n["what"]): n["at"] for n in lines}
    # Two slots were free, yet attempt 2 began only once attempt 1's thread ended.
    assert times[(1, "end")] <= times[(2, "start")]
    daemon.stop()


def test_drain_waits_for_an_abandoned_thread_then_says_so(url, tmp_path, start):
    notes = tmp_path / "notes.jsonl"
    config = write_config(tmp_path / "c.toml", url, PLAIN, concurrency=1, drain_timeout=1)
    daemon = start(config)
    run_id = trigger(url, "blocking", {"file": str(notes), "seconds": 600}, scope="a")
    daemon.wait_for("step_abandoned", run_id=run_id)
    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=20) == 0  # a requested stop
    assert time.monotonic() - began < 10
    left = daemon.wait_for("drain_abandoned")
    assert left["steps"] == [
        {
            "run_id": run_id,
            "job": "blocking",
            "step": "sw_stepjobs:blocking_span",
            "runtime": "thread",
        }
    ]
    assert status_of(url, run_id) == "failed"


TICKING = """
[jobs.ticking]
timeout = 0.5
steps = ["sw_fencejobs:ticking_plain"]
"""


def test_a_given_up_thread_is_stopped_at_its_next_call(url, tmp_path, start):
    """A plain function that works in Python (a loop, not one blocking call)
    is stopped by its thread's hook once its run gives it up (the timeout):
    its slot comes back within a tick, and it executes nothing after."""
    ticks = tmp_path / "ticks"
    daemon = start(write_config(tmp_path / "c.toml", url, TICKING, concurrency=1))
    run_id = trigger(url, "ticking", {"file": str(ticks), "first": 30, "then": 30})
    daemon.wait_for("step_abandoned", run_id=run_id)
    ended = daemon.wait_for("abandoned_step_ended", run_id=run_id, timeout=5)
    assert ended["seconds_after"] < 0.5
    wait_until(lambda: status_of(url, run_id) == "failed", timeout=5, what="the run failed")
    size = ticks.stat().st_size
    time.sleep(0.5)
    assert ticks.stat().st_size == size  # no tick since
    assert daemon.stop() == 0


# -- isolation = "process" --------------------------------------------------------------

PROCESS = """
[jobs.child]
isolation = "process"
timeout = 1.5
steps = ["sw_stepjobs:ticking"]

[jobs.context]
isolation = "process"
scopes = ["s1"]
steps = ["sw_stepjobs:report_context"]

[jobs.fails]
isolation = "process"
steps = ["sw_stepjobs:fails_in_child"]

[jobs.child_plain]
isolation = "process"
timeout = 1.5
steps = ["sw_stepjobs:ticking_plain"]
"""


def child_pid(url: str, run_id: int) -> int:
    rows = wait_until(
        lambda: query(
            url, "SELECT pid FROM step_span WHERE run_id = %s AND what = 'start'", (run_id,)
        ),
        what="the child's start",
    )
    return int(rows[0][0])


def test_process_step_is_killed_on_timeout(url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", url, PROCESS))
    run_id = trigger(url, "child")
    pid = child_pid(url, run_id)
    assert pid != daemon.proc.pid
    wait_until(lambda: status_of(url, run_id) == "failed", timeout=15, what="the run timed out")
    [(error,)] = query(url, "SELECT error FROM syncworker.runs WHERE id = %s", (run_id,))
    assert error == "timed out after 1.5 s"
    assert not pid_alive(pid)
    # Ticks reached the run's counters through the pipe.
    [(processed,)] = query(
        url, "SELECT records_processed FROM syncworker.runs WHERE id = %s", (run_id,)
    )
    assert processed > 0
    assert daemon.events("ticking_started", run_id=run_id)[0]["pid"] == pid
    # Nothing is written once it is gone.
    last = spans(url, run_id)[-1][3]
    [(ended,)] = query(url, "SELECT finished_at FROM syncworker.runs WHERE id = %s", (run_id,))
    assert last <= ended
    time.sleep(0.5)
    assert spans(url, run_id)[-1][3] == last
    daemon.stop()


def test_fenced_process_step_is_killed_at_once(url, tmp_path, start):
    jobs = PROCESS.replace("timeout = 1.5", "timeout = 600")
    daemon = start(write_config(tmp_path / "c.toml", url, jobs))
    run_id = trigger(url, "child")
    pid = child_pid(url, run_id)
    # What a takeover looks like from here: the row is another worker's now.
    execute(url, "UPDATE syncworker.runs SET worker_id = 'peer:1:abcdef' WHERE id = %s", (run_id,))
    daemon.wait_for("run_fenced", run_id=run_id, timeout=10)
    fenced_at = time.monotonic()
    wait_until(lambda: not pid_alive(pid), timeout=5, what="the child killed")
    assert time.monotonic() - fenced_at < 2  # SIGKILL, no grace
    last = spans(url, run_id)[-1][3]
    time.sleep(0.5)
    assert spans(url, run_id)[-1][3] == last
    daemon.stop()


def test_blocking_plain_function_in_a_process_is_killed(url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", url, PROCESS), env={"SW_TEST_URL": url})
    run_id = trigger(url, "child_plain")
    pid = child_pid(url, run_id)
    wait_until(lambda: status_of(url, run_id) == "failed", timeout=15, what="the run timed out")
    wait_until(lambda: not pid_alive(pid), timeout=10, what="the child gone")
    assert not daemon.events("step_abandoned")  # killed, not abandoned
    last = spans(url, run_id)[-1][3]
    time.sleep(0.5)
    assert spans(url, run_id)[-1][3] == last
    daemon.stop()


def test_process_step_sees_the_drain_request(url, tmp_path, start):
    jobs = PROCESS.replace("timeout = 1.5", "timeout = 600")
    daemon = start(write_config(tmp_path / "c.toml", url, jobs))
    run_id = trigger(url, "child", {"cooperative": True})
    child_pid(url, run_id)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=20) == 0
    # It saw `stopping` and returned early: the drain rule requeues its run.
    assert [w for _, _, w, _ in spans(url, run_id)][-1] == "stopped early"
    assert status_of(url, run_id) == "pending"
    line = daemon.wait_for("run_cancelled", run_id=run_id)
    assert line["reason"] == "interrupted by shutdown"


def test_process_step_is_killed_at_drain_timeout(url, tmp_path, start):
    config = write_config(
        tmp_path / "c.toml", url, PROCESS.replace("timeout = 1.5", "timeout = 600"), drain_timeout=1
    )
    daemon = start(config)
    run_id = trigger(url, "child")
    pid = child_pid(url, run_id)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=20) == 0
    assert not pid_alive(pid)
    assert status_of(url, run_id) == "pending"  # requeued, to be redone
    last = spans(url, run_id)[-1][3]
    time.sleep(0.5)
    assert spans(url, run_id)[-1][3] == last


def test_process_step_sees_its_context_and_reports_back(url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", url, PROCESS))
    run_id = trigger(url, "context", {"k": "v"}, scope="s1")
    wait_until(lambda: status_of(url, run_id) == "succeeded", what="the run succeeded")
    [(pid, what)] = query(url, "SELECT pid, what FROM step_span WHERE run_id = %s", (run_id,))
    assert pid != daemon.proc.pid
    seen = json.loads(what)
    assert seen == {
        "run_id": run_id,
        "job": "context",
        "scope": "s1",
        "source": "sql",
        "triggered_by": "postgres",
        "payload": {"k": "v"},
        "attempt": 1,
    }
    line = daemon.wait_for("from_child", run_id=run_id)
    assert line["pid"] == pid and line["step"] == "sw_stepjobs:report_context"
    [(total, inserted, updated, processed)] = query(
        url,
        "SELECT records_total, records_inserted, records_updated, records_processed"
        " FROM syncworker.runs WHERE id = %s",
        (run_id,),
    )
    assert (total, inserted, updated, processed) == (10, 2, 3, 5)
    failing = trigger(url, "fails")
    wait_until(lambda: status_of(url, failing) == "failed", what="the failing run")
    [(error,)] = query(url, "SELECT error FROM syncworker.runs WHERE id = %s", (failing,))
    assert error == "ValueError: broken in the child"
    daemon.stop()


# -- an async step that swallows its cancellation --------------------------------------

SWALLOW = """
[jobs.swallow]
retries = 1
retry_backoff = 0
steps = ["sw_stepjobs:swallow"]
"""


@pytest.mark.parametrize("how", ["sigterm", "second_signal"])
def test_swallowed_cancellation_requeues_and_exits_70(url, tmp_path, start, how):
    daemon = start(
        write_config(
            tmp_path / "c.toml", url, SWALLOW, drain_timeout=1 if how == "sigterm" else 600
        )
    )
    run_id = trigger(url, "swallow")
    child_start = wait_until(lambda: spans(url, run_id), what="the step's start")
    assert child_start
    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    if how == "second_signal":
        daemon.wait_for("drain_started")
        daemon.signal(signal.SIGINT)
    # drain (1 s) + the cancel grace (10 s), not the step's 600 s.
    assert daemon.wait_exit(timeout=30) == 70
    assert time.monotonic() - began < 20
    abandoned = daemon.wait_for("step_abandoned", run_id=run_id)
    assert abandoned["runtime"] == "task"
    assert abandoned["reason"] == ("drain timeout" if how == "sigterm" else "second signal")
    daemon.wait_for("worker_exit_abandoned")
    assert status_of(url, run_id) == "pending"
    assert query(url, "SELECT count(*) FROM syncworker.runs WHERE status = 'running'") == [(0,)]


def test_swallowed_cancellation_at_timeout_fails_the_run_and_restarts(url, tmp_path, start):
    jobs = SWALLOW.replace("retries = 1", "retries = 0\ntimeout = 0.5")
    daemon = start(write_config(tmp_path / "c.toml", url, jobs, drain_timeout=1))
    run_id = trigger(url, "swallow")
    # timeout (0.5 s) + grace (10 s); then the worker drains by itself, exits 70.
    assert daemon.wait_exit(timeout=30) == 70
    abandoned = daemon.wait_for("step_abandoned", run_id=run_id)
    assert abandoned["reason"] == "timeout"
    daemon.wait_for("worker_restart_needed", run_id=run_id)
    assert status_of(url, run_id) == "failed"
    [(error,)] = query(url, "SELECT error FROM syncworker.runs WHERE id = %s", (run_id,))
    assert error == "timed out after 0.5 s"


def test_a_step_blocking_the_loop_cannot_hang_a_stop(url, tmp_path, start):
    jobs = '[jobs.hog]\nsteps = ["sw_stepjobs:blocks_the_loop"]\n'
    config = write_config(tmp_path / "c.toml", url, jobs, drain_timeout=1)
    daemon = start(config)
    run_id = trigger(url, "hog")
    wait_until(lambda: spans(url, run_id), what="the step's start")
    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    # drain_timeout (1) + CANCEL_GRACE (10) + STALL_MARGIN (5), not 600 s.
    assert daemon.wait_exit(timeout=40) == 70
    assert time.monotonic() - began < 25
    daemon.wait_for("worker_loop_stalled")
    # The exit freed its liveness lock: the next start recovers the run
    # (failed here: its one attempt was used).
    start(config).wait_for("run_recovered", run_id=run_id)
    assert status_of(url, run_id) == "failed"


# -- sys.exit and os._exit ----------------------------------------------------------------

EXITS = """
[jobs.sysexit]
steps = ["sw_stepjobs:calls_sys_exit"]

[jobs.sysexit_thread]
steps = ["sw_stepjobs:calls_sys_exit_in_thread"]

[jobs.callback_exit]
steps = ["sw_stepjobs:sys_exit_from_a_callback"]

[jobs.osexit]
retries = 1
steps = ["sw_stepjobs:calls_os_exit"]
"""


def test_sys_exit_in_a_step_fails_the_step_not_the_worker(url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", url, EXITS))
    in_loop = trigger(url, "sysexit")
    in_thread = trigger(url, "sysexit_thread")
    for run_id, code in ((in_loop, "0"), (in_thread, "3")):
        wait_until(lambda r=run_id: status_of(url, r) == "failed", what=f"run {run_id} failed")
        [(error,)] = query(url, "SELECT error FROM syncworker.runs WHERE id = %s", (run_id,))
        assert error == f"the step called sys.exit({code})"
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0


def test_sys_exit_escaping_to_the_loop_exits_non_zero(url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", url, EXITS))
    trigger(url, "callback_exit")
    assert daemon.wait_exit(timeout=20) == 70
    daemon.wait_for("worker_exit_unrequested", code=0, exit_code=70)


def test_os_exit_zero_in_a_step_exits_non_zero_and_the_run_is_recovered(url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", url, EXITS)
    daemon = start(config)
    run_id = trigger(url, "osexit")
    assert daemon.wait_exit(timeout=20) == 70
    line = daemon.wait_for("worker_exit_unrequested")
    assert (line["code"], line["exit_code"], line["run_id"]) == (0, 70, run_id)
    assert status_of(url, run_id) == "running"
    # The next start (what a supervisor does on a non-zero exit) recovers it.
    start(config)
    wait_until(lambda: status_of(url, run_id) == "succeeded", what="the recovered run")
    assert [what for _, _, what, _ in spans(url, run_id)] == ["exiting", "done"]


def test_isolation_is_validated(tmp_path, database_url):
    from tests.harness import cli

    config = write_config(
        tmp_path / "c.toml",
        database_url,
        '[jobs.x]\nisolation = "fork"\nsteps = ["sw_stepjobs:swallow"]\n',
    )
    result = cli("check", "--config", str(config))
    assert result.returncode == 78
    assert "jobs.x.isolation" in result.stderr
    assert "Traceback" not in result.stderr
