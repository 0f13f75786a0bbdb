"""Database errors handled on purpose (issue 13, dberrors.py): settings the
server refuses end a start with exit 78 and the server's reason; a server
that turns read-only (a fail-over) is waited out, nothing left `running`."""

from __future__ import annotations

import time

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.harness import Daemon, cli, execute, query, wait_until, write_config
from tests.invariants import assert_invariants, trigger

JOBS = """
[jobs.solo]
steps = ["sw_testjobs:record"]

[jobs.slow]
steps = ["sw_testjobs:slow"]
"""


def _with(url: str, **fields: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(url), **fields})


def test_run_with_a_database_or_role_the_server_refuses_exits_78(database_url, tmp_path):
    for fields, said in (
        ({"dbname": "sw_no_such_database"}, 'database "sw_no_such_database" does not exist'),
        ({"user": "sw_no_such_role"}, 'role "sw_no_such_role" does not exist'),
    ):
        config = write_config(tmp_path / "c.toml", _with(database_url, **fields), JOBS)
        began = time.monotonic()
        daemon = Daemon(config)
        code = daemon.wait_exit(timeout=60)
        assert code == 78, daemon.log_text()
        assert time.monotonic() - began < 30  # not an outage waited out for ever
        text = daemon.log_text()
        assert "config error" in text and said in text and "database_url" in text
        assert "Traceback" not in text
        for command in (["status"], ["trigger", "solo"]):
            proc = cli(*command, "--config", str(config))
            assert proc.returncode == 78, (command, proc.stderr)
            assert said in proc.stderr and "Traceback" not in proc.stderr


def _read_only(url: str, on: bool) -> None:
    """What a fail-over to a replica looks like from here: every session the
    worker opens from now on is read-only; its current ones are cut."""
    name = conninfo_to_dict(url)["dbname"]
    value = sql.SQL("on" if on else "off")
    with psycopg.connect(_with(url, dbname="postgres"), autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = {}").format(
                sql.Identifier(name), value
            )
        )
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()"
            " AND application_name <> 'sw_test_admin'",
            (name,),
        )


def test_a_server_turning_read_only_is_waited_out(database_url, tmp_path, start):
    daemon = start(write_config(tmp_path / "c.toml", database_url, JOBS))
    run_id = trigger(database_url, "slow", seconds=3)
    daemon.wait_for("run_started", run_id=run_id)
    # The step's own first write (its line in test_log) made, so that what
    # the read-only server refuses is the worker's writes, not the step's.
    wait_until(
        lambda: (
            query(database_url, "SELECT count(*) FROM test_log WHERE run_id = %s", (run_id,))
            == [(1,)]
        ),
        what="the step's first line",
    )
    _read_only(database_url, True)
    # The worker rides it out: its writes fail as read-only and are retried.
    daemon.wait_for("heartbeat_failed", timeout=20)
    assert daemon.proc.poll() is None
    time.sleep(3)  # past the step's end: its outcome cannot be written yet
    assert daemon.proc.poll() is None
    _read_only(database_url, False)
    wait_until(
        lambda: (
            query(database_url, "SELECT status FROM syncworker.runs WHERE id = %s", (run_id,))
            in ([("succeeded",)], [("pending",)])
        ),
        what="the run settled once the server took writes again",
        timeout=60,
    )
    after = trigger(database_url, "solo")
    daemon.wait_for("run_succeeded", run_id=after, timeout=30)
    wait_until(
        lambda: (
            query(
                database_url,
                "SELECT count(*) FROM syncworker.runs WHERE status IN ('pending', 'running')",
            )
            == [(0,)]
        ),
        what="nothing left pending or running",
        timeout=60,
    )
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log_text()
    assert_invariants(database_url)
    execute(database_url, "SELECT 1")


def test_a_stop_while_the_database_is_down_ends_the_start_at_once(tmp_path):
    """Two Ctrl-C's, or one SIGTERM, while every connection attempt hangs: the
    start is given up at once, not after the 10 s connect timeout."""
    import signal

    from tests.stallproxy import StallProxy

    # A server that accepts and never answers: each attempt waits its
    # connect_timeout out unless the stop cuts it short.
    proxy = StallProxy("127.0.0.1", 9)  # never reached: stalled from the start
    proxy.stall()
    try:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
        daemon = Daemon(write_config(tmp_path / "c.toml", url, JOBS))
        daemon.wait_for("worker_starting")
        time.sleep(1.0)  # inside the first connection attempt
        began = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(30) == 0
        assert time.monotonic() - began < 3.0
        assert "Traceback" not in daemon.log_text()
    finally:
        proxy.close()
