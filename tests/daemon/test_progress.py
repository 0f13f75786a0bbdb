"""Live progress: run_progress events, `trigger --wait` on a terminal and in a
log, and `status --watch`."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from syncworker.orchestrator import PROGRESS_INTERVAL
from syncworker.progress import ProgressView
from tests.harness import _base_env, cli, execute, query, write_config

T = TypeVar("T")

JOBS = """
[jobs.prog]
steps = ["sw_testjobs:progress"]

[jobs.burst]
steps = ["sw_testjobs:burst"]

[jobs.sync]
scopes = ["RIO", "HOU"]
steps = ["sw_testjobs:record"]
"""
STEP = "sw_testjobs:progress"


def events_until_done(url: str, job: str, payload: str = "{}") -> tuple[int, list[dict[str, Any]]]:
    """Trigger `job` through SQL and return its run id and every event about
    it, from run_started to its end, as a listener on sync_events saw them."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("LISTEN sync_events")
        [(run_id, _)] = conn.execute(
            "SELECT * FROM syncworker.trigger(%s, payload => %s::jsonb)", (job, payload)
        ).fetchall()
        seen: list[dict[str, Any]] = []
        for note in conn.notifies(timeout=60):
            event = json.loads(note.payload)
            if event["run_id"] == run_id:
                seen.append(event)
                if event["event"] in ("run_succeeded", "run_failed"):
                    return run_id, seen
    raise AssertionError(f"run {run_id} did not end; events: {seen}")


def test_a_running_step_publishes_its_progress(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    run_id, seen = events_until_done(database_url, "prog")
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "run_started" and kinds[-1] == "run_succeeded", kinds
    progress = [e for e in seen if e["event"] == "run_progress"]
    assert kinds[1:-1] == ["run_progress"] * len(progress)
    # About 3 s of counting in five chunks, flushed once a second.
    assert len(progress) >= 2, seen
    done = [e["records_processed"] for e in progress]
    assert done == sorted(set(done)), f"not increasing: {done}"
    assert done[0] > 0 and done[-1] <= 10_000
    for event in progress:
        assert event == {
            "event": "run_progress",
            "run_id": run_id,
            "job": "prog",
            "scope": None,
            "status": "running",
            "step": STEP,
            "records_processed": event["records_processed"],
            "records_total": 10_000,
        }
    [(processed, total, step)] = query(
        database_url,
        "SELECT records_processed, records_total, current_step FROM syncworker.runs WHERE id = %s",
        (run_id,),
    )
    assert (processed, total, step) == (10_000, 10_000, None)
    assert not daemon.events("progress_write_failed")


def test_progress_is_flushed_at_most_once_a_second(database_url, tmp_path, start):
    start(write_config(tmp_path / "c.toml", database_url, JOBS))
    # 10,000 counts over about 2.5 s.
    run_id, seen = events_until_done(database_url, "burst", '{"seconds": 2.5}')
    assert seen[-1]["event"] == "run_succeeded"
    progress = [e for e in seen if e["event"] == "run_progress"]
    [(duration_ms,)] = query(
        database_url, "SELECT duration_ms FROM syncworker.runs WHERE id = %s", (run_id,)
    )
    most = duration_ms / 1000 / PROGRESS_INTERVAL + 1
    assert 1 <= len(progress) <= most, (len(progress), duration_ms)
    done = [e["records_processed"] for e in progress]
    assert done == sorted(set(done)) and done[-1] <= 10_000


def test_trigger_wait_in_a_log_prints_progress_lines(database_url, tmp_path, start):
    config = str(start(write_config(tmp_path / "c.toml", database_url, JOBS)).config)
    begun = time.monotonic()
    result = cli("trigger", "prog", "--wait", "--config", config)
    took = time.monotonic() - begun
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    progress = [
        ln for ln in lines if re.fullmatch(rf"run \d+ prog: running \d+/10000 step {STEP}", ln)
    ]
    assert progress, result.stderr
    assert len(progress) <= took / PROGRESS_INTERVAL + 1, result.stderr
    assert re.fullmatch(r"run \d+ prog: succeeded 10000/10000", lines[-1]), result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr

    quiet = cli("trigger", "prog", "--wait", "--json", "--config", config)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert [r["status"] for r in json.loads(quiet.stdout)["runs"]] == ["succeeded"]


def test_trigger_wait_on_a_terminal_redraws_a_bar(database_url, tmp_path, start):
    config = str(start(write_config(tmp_path / "c.toml", database_url, JOBS)).config)
    master, slave = pty.openpty()
    # Raw, so every \r in the output is one the CLI wrote (no \n -> \r\n), and
    # wide, so no line is cut.
    tty.setraw(slave)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncworker", "trigger", "prog", "--wait", "--config", config],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=_base_env(),
    )
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(60)
        reader.join(10)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    screen = b"".join(chunks).decode()
    assert code == 0, screen
    bars = re.findall(
        rf"\rrun \d+ prog  \[([#.]{{20}})\]  (\d+)/10000  step {STEP}  \d+\.\ds\x1b\[K", screen
    )
    assert len(bars) >= 2, repr(screen)
    assert {bar for bar, _ in bars} != {"." * 20}, bars
    assert re.search(r"\rrun \d+ prog  succeeded  10000/10000  \d+\.\ds\x1b\[K\n$", screen), repr(
        screen
    )


class Output:
    """Lines a subprocess writes to stdout, collected as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait(self, check: Callable[[list[str]], T | None], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        with self._cond:
            while (value := check(self.lines)) is None:
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    raise AssertionError(f"no {what}; output:\n" + "\n".join(self.lines[-40:]))
                self._cond.wait(remaining)
            return value


def watch(config: str, *args: str) -> tuple[subprocess.Popen[str], Output]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncworker", "status", "--watch", *args, "--config", config],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_base_env(),
    )
    return proc, Output(proc)


def stop_watch(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.stderr is not None
    return code, proc.stderr.read()


def trigger(config: str) -> int:
    made = cli("trigger", "sync", "--scope", "RIO", "--json", "--config", config)
    assert made.returncode == 0, made.stderr
    [run_id] = json.loads(made.stdout)["runs"]
    return int(run_id)


def test_status_watch_refreshes_until_ctrl_c(database_url, tmp_path, start):
    config = str(start(write_config(tmp_path / "c.toml", database_url, JOBS)).config)
    proc, out = watch(config, "--interval", "0.5")
    out.wait(lambda lines: "RECENT RUNS" in lines or None, 30, "a first snapshot")
    run_id = trigger(config)
    row = re.compile(rf"\s+{run_id}\s+sync\s+RIO\s+succeeded\b")
    out.wait(
        lambda lines: any(row.match(line) for line in lines) or None,
        30,
        f"run {run_id} succeeded",
    )
    code, err = stop_watch(proc)
    assert code == 0, err
    snapshots = [line for line in out.lines if re.fullmatch(r"--- \S+ \S+Z ---", line)]
    assert len(snapshots) >= 2
    assert not any("\x1b" in line for line in out.lines)


def test_status_watch_json_is_woken_by_run_events(database_url, tmp_path, start):
    config = str(start(write_config(tmp_path / "c.toml", database_url, JOBS)).config)
    # An interval far longer than the test: only run events can bring the
    # snapshots that show the run.
    proc, out = watch(config, "--json", "--interval", "600")
    out.wait(lambda lines: lines or None, 30, "a first snapshot")
    run_id = trigger(config)

    def succeeded(lines: list[str]) -> bool | None:
        runs = json.loads(lines[-1])["runs"]
        return any(r["id"] == run_id and r["status"] == "succeeded" for r in runs) or None

    out.wait(succeeded, 30, f"run {run_id} succeeded")
    code, err = stop_watch(proc)
    assert code == 0, err
    docs = [json.loads(line) for line in out.lines]
    assert all(set(d) == {"workers", "jobs", "runs", "summary", "actions"} for d in docs)


def test_a_failing_progress_write_does_not_fail_the_run(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, JOBS)
    assert cli("migrate", "--config", str(config)).returncode == 0
    # Refuses exactly the flushes: writes to a running row that keep its step
    # and status. The step-start, step-end and outcome writes get through.
    execute(
        database_url,
        """
        CREATE FUNCTION refuse_progress() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.status = 'running' AND NEW.status = 'running'
               AND NEW.current_step IS NOT DISTINCT FROM OLD.current_step THEN
                RAISE EXCEPTION 'progress refused';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_progress BEFORE UPDATE ON syncworker.runs
            FOR EACH ROW EXECUTE FUNCTION refuse_progress();
        """,
    )
    daemon = start(config)
    run_id, seen = events_until_done(database_url, "prog")
    assert [e["event"] for e in seen] == ["run_started", "run_succeeded"]
    [(status, processed)] = query(
        database_url,
        "SELECT status, records_processed FROM syncworker.runs WHERE id = %s",
        (run_id,),
    )
    assert (status, processed) == ("succeeded", 10_000)
    failures = daemon.events("progress_write_failed", run_id=run_id)
    # Said once at warning level, then at debug level while it goes on.
    assert [f["level"] for f in failures][:2] == ["warning", "debug"], failures
    assert "progress refused" in failures[0]["error"]


def test_a_log_gets_at_most_one_progress_line_per_run_per_second():
    now = [0.0]
    out = io.StringIO()
    view = ProgressView(out, [7], live=False, clock=lambda: now[0])
    row = {
        "id": 7,
        "job": "sync",
        "scope": "RIO",
        "status": "running",
        "current_step": None,
        "records_processed": 0,
        "records_total": None,
        "error": None,
        "duration_ms": None,
    }
    view.row(row)
    for at, done in [(0.1, 100), (0.6, 200), (1.2, 300), (1.3, 400), (2.5, 400)]:
        now[0] = at
        view.event(
            {"run_id": 7, "job": "sync", "scope": "RIO", "status": "running", "step": "fetch"}
            | {"records_processed": done, "records_total": 1000}
        )
    view.row(row | {"status": "succeeded", "records_processed": 1000, "records_total": 1000})
    assert out.getvalue().splitlines() == [
        "run 7 sync/RIO: running",
        "run 7 sync/RIO: running 300/1000 step fetch",
        "run 7 sync/RIO: running 400/1000 step fetch",
        "run 7 sync/RIO: succeeded 1000/1000",
    ]
