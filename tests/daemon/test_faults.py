"""Real faults under real daemon processes: the database going away (restarted,
or stopped for 30 s) while idle and during a run, the LISTEN session killed,
every instance stopped in a burst, steps that ignore cancellation or outnumber
a thread pool. After each: no trigger lost, no run left running, no cron fire
run twice, and the daemons still serve.

The outage tests run their own embedded PostgreSQL, since they stop it.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from syncworker.embedded import EmbeddedPostgres
from tests.harness import Daemon, cli, execute, query, release, wait_until, write_config
from tests.invariants import assert_invariants, trigger
from tests.jobs.sw_testjobs import SETUP_SQL

# How long the server stays down in the stopped-server scenarios: past 31 s,
# the third doubling of a back-off that starts at 1 s, so an uncapped
# back-off (psycopg_pool's default) would next try only at about 63 s.
OUTAGE = float(os.environ.get("SYNCWORKER_TEST_OUTAGE", "40"))
SERVED_AFTER_RESTART = 20.0

JOBS = """
[jobs.solo]
steps = ["sw_testjobs:record"]

[jobs.span]
scopes = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
steps = ["sw_testjobs:span"]

[jobs.slow]
steps = ["sw_testjobs:slow"]

[jobs.hold]
steps = ["sw_testjobs:wait_release"]

[jobs.tick]
schedule = "* * * * * *"
steps = ["sw_testjobs:record"]
"""


@pytest.fixture
def server() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as pg:
        execute(pg.url, SETUP_SQL)
        yield pg


def _served(url: str, job: str, scope: str | None = None) -> int:
    run_id = trigger(url, job, scope)
    wait_until(
        lambda: (
            query(url, "SELECT status FROM syncworker.runs WHERE id = %s", (run_id,))
            == [("succeeded",)]
        ),
        what=f"run {run_id} of {job} served",
    )
    return run_id


def _idle(url: str) -> bool:
    return query(
        url,
        "SELECT count(*) FROM syncworker.runs WHERE status IN ('pending', 'running')"
        " AND job <> 'tick'",
    ) == [(0,)]


def _log_time(record: dict[str, object]) -> float:
    return datetime.fromisoformat(str(record["timestamp"])).timestamp()


def _stop_all(daemons: list[Daemon]) -> None:
    for d in daemons:
        d.signal(signal.SIGTERM)
    for d in daemons:
        try:
            code = d.wait_exit(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("no exit 60 s after SIGTERM:\n" + d.log_text()[-6000:]) from None
        assert code == 0, d.log_text()[-3000:]
        # Through every fault the log stays one JSON event a line, libraries'
        # own warnings (psycopg_pool's connection errors) included.
        stray = [line for line in d.raw if line.strip() and not line.startswith("{")]
        assert stray == [], f"non-JSON lines on stderr: {stray[:5]}"


def _two_workers(config: Path, daemons: list[Daemon]) -> list[Daemon]:
    pair = [Daemon(config), Daemon(config)]
    daemons.extend(pair)
    for d in pair:
        d.ready()
    return pair


def _slow_run_under_way(url: str, seconds: float) -> int:
    run_id = trigger(url, "slow", seconds=seconds)
    wait_until(
        lambda: query(url, "SELECT 1 FROM test_log WHERE run_id = %s", (run_id,)),
        what="the run under way",
    )
    return run_id


def _outage(server: EmbeddedPostgres, pair: list[Daemon], seconds: float) -> float:
    """Stop the server until both workers noticed and `seconds` passed, start
    it again; returns the wall-clock time it was started."""
    server.stop()
    down_at = time.monotonic()
    for d in pair:
        d.wait_for("db_disconnected")
    time.sleep(max(0.0, seconds - (time.monotonic() - down_at)))  # the outage itself
    server.start()
    return time.time()


def _slow_settled(url: str) -> bool:
    """One slow run succeeded and no run (cron ticks aside) is pending or running."""
    succeeded = query(
        url, "SELECT count(*) FROM syncworker.runs WHERE job = 'slow' AND status = 'succeeded'"
    )
    return succeeded == [(1,)] and _idle(url)


@pytest.mark.parametrize("outage", [0.0, OUTAGE], ids=["restart", "stopped"])
def test_database_outage_while_idle(server, tmp_path, daemons, outage):
    url = server.url
    pair = _two_workers(write_config(tmp_path / "c.toml", url, JOBS), daemons)

    server.stop()
    down_at = time.monotonic()
    for d in pair:
        d.wait_for("db_disconnected")
    # A durable trigger cannot be stored while the server is down: the caller
    # is told so (exit 69), it is not silently dropped.
    refused = cli("trigger", "solo", "--config", str(pair[0].config))
    assert refused.returncode == 69, refused.stderr
    # The outage itself is the scenario: keep the server down this long.
    time.sleep(max(0.0, outage - (time.monotonic() - down_at)))
    for d in pair:
        assert d.proc.poll() is None

    server.start()
    up_at = time.time()
    # Stored before the workers listen again: found once they do.
    durable = trigger(url, "solo")
    reconnects = []
    for d in pair:
        record = d.wait_for("db_reconnected", timeout=30)
        reconnects.append(_log_time(record) - up_at)
    print(
        f"outage {outage:.0f} s: reconnect after server start median"
        f" {statistics.median(reconnects) * 1000:.0f} ms, max {max(reconnects) * 1000:.0f} ms"
    )
    wait_until(
        lambda: (
            query(url, "SELECT status FROM syncworker.runs WHERE id = %s", (durable,))
            == [("succeeded",)]
        ),
        # The listener retries at least every 10 s and the pool's attempts
        # are capped as well: served within SERVED_AFTER_RESTART of the start.
        timeout=max(1.0, up_at + SERVED_AFTER_RESTART - time.time()),
        what="the trigger stored during the reconnect served",
    )
    execute(url, "NOTIFY sync_trigger, 'solo'")  # the raw NOTIFY path works again
    wait_until(
        lambda: (
            # Both instances hear it; their triggers coalesce or follow up.
            query(url, "SELECT count(*) >= 2 FROM syncworker.runs WHERE job = 'solo'") == [(True,)]
            and _idle(url)
        ),
        what="a NOTIFY after the reconnect served",
    )
    last = {("span", "a"): _served(url, "span", "a")}
    _stop_all(pair)
    assert_invariants(url, last_trigger={**last, ("solo", None): durable}, pending_ok=True)


@pytest.mark.parametrize("outage", [0.0, OUTAGE], ids=["restart", "stopped"])
def test_database_outage_during_a_run(server, tmp_path, daemons, outage):
    url = server.url
    pair = _two_workers(write_config(tmp_path / "c.toml", url, JOBS), daemons)
    # Outlives the outage by a few seconds, touching the database only at start.
    run_id = _slow_run_under_way(url, outage + 3)
    _outage(server, pair, outage)
    # Whoever holds it when the dust settles (its worker, or a survivor after
    # a fence) finishes it: one success, nothing left running.
    wait_until(lambda: _slow_settled(url), timeout=90, what="the interrupted run settled")
    for d in pair:
        assert d.proc.poll() is None
    last = {("solo", None): _served(url, "solo")}
    _stop_all(pair)
    assert_invariants(url, last_trigger={**last, ("slow", None): run_id}, pending_ok=True)


def test_a_run_ending_while_the_server_is_down_is_recorded_soon_after(server, tmp_path, daemons):
    """The run's last write is retried through the outage; the pool's own
    attempts began with it and must not have backed off past the restart."""
    url = server.url
    pair = _two_workers(write_config(tmp_path / "c.toml", url, JOBS), daemons)
    run_id = _slow_run_under_way(url, 2)
    up_at = _outage(server, pair, OUTAGE)
    wait_until(
        lambda: _slow_settled(url),
        timeout=max(1.0, up_at + SERVED_AFTER_RESTART - time.time()),
        what="the run that ended during the outage recorded",
    )
    print(f"outage {OUTAGE:.0f} s: run's outcome recorded {time.time() - up_at:.1f} s after start")
    _stop_all(pair)
    assert_invariants(url, last_trigger={("slow", None): run_id}, pending_ok=True)


def test_listen_session_terminated(server, tmp_path, daemons):
    url = server.url
    daemon = Daemon(write_config(tmp_path / "c.toml", url, JOBS, concurrency=2))
    daemons.append(daemon)
    daemon.ready()
    hold = trigger(url, "hold")
    wait_until(lambda: query(url, "SELECT 1 FROM test_log WHERE run_id = %s", (hold,)), what="hold")

    [(killed,)] = query(
        url,
        "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l"
        " JOIN syncworker.workers w ON l.objid = w.lock_key::bigint::oid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND w.pid = %s"
        "   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (daemon.proc.pid,),
    )
    assert killed == 1
    durable = trigger(url, "solo")  # likely while it is deaf; found either way
    daemon.wait_for("db_reconnected")
    wait_until(
        lambda: (
            query(url, "SELECT status FROM syncworker.runs WHERE id = %s", (durable,))
            == [("succeeded",)]
        ),
        what="the durable trigger served",
    )
    execute(url, "NOTIFY sync_trigger, 'solo'")
    wait_until(
        lambda: (
            query(
                url,
                "SELECT count(*) FROM syncworker.runs WHERE job = 'solo' AND status = 'succeeded'",
            )
            == [(2,)]
        ),
        what="a NOTIFY served after the reconnect",
    )
    # Its own run went on untouched: same attempt, same worker, no fence.
    release(url)
    wait_until(
        lambda: (
            query(url, "SELECT status, attempt FROM syncworker.runs WHERE id = %s", (hold,))
            == [("succeeded", 1)]
        ),
        what="the held run finishing in place",
    )
    assert daemon.events("run_fenced") == [] and daemon.events("run_recovered") == []
    assert daemon.stop() == 0
    assert_invariants(url, last_trigger={("solo", None): durable}, pending_ok=True)


def test_sigterm_to_every_instance_during_a_burst(database_url, tmp_path, start):
    config = write_config(tmp_path / "c.toml", database_url, JOBS, concurrency=2)
    workers = [start(config) for _ in range(3)]
    last: dict[tuple[str, str | None], int] = {}
    sent = threading.Semaphore(0)
    scopes = "abcdefghij"

    def burst() -> None:
        for i in range(600):
            scope = scopes[i % len(scopes)]
            last[("span", scope)] = trigger(database_url, "span", scope, ms=10)
            sent.release()

    sender = threading.Thread(target=burst)
    sender.start()
    for _ in range(150):
        assert sent.acquire(timeout=30)
    for w in workers:
        w.signal(signal.SIGTERM)
    for w in workers:
        assert w.wait_exit(60) == 0
        w.wait_for("drain_started")
    sender.join(120)
    assert not sender.is_alive()
    # With every worker gone nothing is running; the rest waits, durable.
    assert query(database_url, "SELECT count(*) FROM syncworker.runs WHERE status = 'running'") == [
        (0,)
    ]
    assert_invariants(database_url, pending_ok=True)
    successor = start(config)
    wait_until(lambda: _idle(database_url), what="a new worker serving the backlog")
    # Stopped before the check: its every-second cron run may be under way.
    _stop_all([successor])
    assert_invariants(database_url, last_trigger=last, pending_ok=True)


def test_a_step_that_ignores_cancellation_times_out_and_the_worker_goes_on(
    database_url, tmp_path, start
):
    jobs = """
[jobs.stuck]
steps = ["sw_testjobs:stuck"]
timeout = 1

[jobs.solo]
steps = ["sw_testjobs:record"]
"""
    # Two slots: the abandoned thread keeps the first until it ends (600 s).
    config = write_config(tmp_path / "c.toml", database_url, jobs, concurrency=2, drain_timeout=1)
    daemon = start(config)
    run_id = trigger(database_url, "stuck")
    wait_until(
        lambda: (
            query(
                database_url, "SELECT status, error FROM syncworker.runs WHERE id = %s", (run_id,)
            )
            == [("failed", "timed out after 1 s")]
        ),
        what="the stuck run timed out",
    )
    _served(database_url, "solo")
    daemon.wait_for("step_abandoned", run_id=run_id, reason="timeout")
    # Its thread is still asleep: it holds the drain only up to drain_timeout.
    assert daemon.stop() == 0
    daemon.wait_for("drain_abandoned")
    assert_invariants(database_url)


def test_more_blocking_steps_than_a_thread_pool_holds(database_url, tmp_path, start):
    """Twelve steps stuck in their threads for good (asyncio's default pool
    has min(32, cpus + 4) threads; 6 on a 2-core machine) must not starve the
    worker: plain functions still run, and reconnecting (which resolves host
    names on the default pool) still works. Each holds its slot while its
    thread runs, so there are slots for all of them and one more."""
    scopes = [f"s{i}" for i in range(12)]
    jobs = f"""
[jobs.jam]
scopes = {scopes!r}
steps = ["sw_testjobs:stuck"]
timeout = 0.5

[jobs.plain]
steps = ["sw_testjobs:plain"]
""".replace("'", '"')
    config = write_config(tmp_path / "c.toml", database_url, jobs, concurrency=13, drain_timeout=1)
    daemon = start(config)
    execute(database_url, "SELECT * FROM syncworker.trigger('jam')")
    wait_until(
        lambda: (
            query(
                database_url,
                "SELECT count(*) FROM syncworker.runs WHERE job = 'jam' AND status = 'failed'",
            )
            == [(12,)]
        ),
        what="twelve stuck runs timed out",
    )
    _served(database_url, "plain")
    query(
        database_url,
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l"
        " JOIN syncworker.workers w ON l.objid = w.lock_key::bigint::oid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND w.pid = %s"
        "   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (daemon.proc.pid,),
    )
    daemon.wait_for("db_reconnected")
    _served(database_url, "plain")
    assert daemon.stop() == 0
    assert_invariants(database_url)
