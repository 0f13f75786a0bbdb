"""Operating a real daemon: sd_notify on a real socket, SIGHUP reloads, and
history pruning, each seen from outside (datagrams, rows, log events)."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from tests.harness import Daemon, execute, query, release, wait_until, write_config

HELD_AND_TICK = """
[jobs.held]
steps = ["sw_testjobs:wait_release"]

[jobs.tick]
schedule = "{schedule}"
steps = ["sw_testjobs:record"]
"""


class NotifySocket:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self._cond:
                self.messages.append(data.decode())
                self._cond.notify_all()

    def wait_for(
        self, check: Callable[[str], bool], what: str, since: int = 0, timeout: float = 30.0
    ) -> int:
        """Index of the first message from `since` on that passes `check`."""

        def found() -> int | None:
            return next(
                (i for i in range(since, len(self.messages)) if check(self.messages[i])), None
            )

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout=timeout):
                raise AssertionError(f"no {what} within {timeout}s; got {self.messages}")
            index = found()
            assert index is not None
            return index

    def count(self, message: str) -> int:
        with self._cond:
            return self.messages.count(message)

    def close(self) -> None:
        self.sock.close()


def test_the_daemon_speaks_the_notify_protocol_on_a_real_socket(database_url, tmp_path, daemons):
    sock = NotifySocket(tmp_path / "notify.sock")
    config = write_config(
        tmp_path / "c.toml", database_url, HELD_AND_TICK.format(schedule="0 0 1 1 *")
    )
    # 0.2 s WatchdogSec: the daemon pings every 0.1 s from its event loop.
    daemon = Daemon(config, env={"NOTIFY_SOCKET": str(sock.path), "WATCHDOG_USEC": "200000"})
    daemons.append(daemon)
    try:
        ready = sock.wait_for(lambda m: "READY=1" in m.splitlines(), "READY=1")
        # READY=1 means LISTEN is in place: a NOTIFY sent now is heard.
        execute(database_url, "NOTIFY sync_trigger, 'tick'")
        daemon.wait_for("trigger_enqueued")
        assert "STATUS=listening on sync_trigger" in sock.messages[ready]
        sock.wait_for(lambda m: m.startswith("STATUS=idle, next tick at "), "an idle STATUS")
        wait_until(lambda: sock.count("WATCHDOG=1") >= 3, what="three watchdog pings")

        execute(database_url, "SELECT syncworker.trigger('held')")
        sock.wait_for(lambda m: m.startswith("STATUS=running run "), "a running STATUS")

        daemon.signal(signal.SIGHUP)
        daemon.wait_for("config_reloaded")
        reloading = sock.wait_for(lambda m: m.startswith("RELOADING=1\n"), "RELOADING=1")
        assert "MONOTONIC_USEC=" in sock.messages[reloading]
        sock.wait_for(lambda m: m == "READY=1", "READY=1 after the reload", since=reloading)

        daemon.signal(signal.SIGTERM)
        sock.wait_for(lambda m: m == "STOPPING=1", "STOPPING=1 at the drain")
        release(database_url)
        assert daemon.wait_exit(30) == 0
    finally:
        sock.close()


def test_sighup_changes_a_schedule_without_dropping_the_run_in_flight(
    database_url, tmp_path, start
):
    path = tmp_path / "c.toml"
    config = write_config(
        path, database_url, HELD_AND_TICK.format(schedule="0 0 1 1 *"), concurrency=2
    )
    daemon = start(config)
    [(held, _)] = query(database_url, "SELECT * FROM syncworker.trigger('held')")
    wait_until(
        lambda: query(database_url, "SELECT 1 FROM test_log WHERE run_id = %s", (held,)),
        what="the held run under way",
    )

    write_config(path, database_url, HELD_AND_TICK.format(schedule="* * * * * *"), concurrency=2)
    daemon.signal(signal.SIGHUP)
    reloaded = daemon.wait_for("config_reloaded")
    assert reloaded["changed"] == ["tick"] and reloaded["runs_in_flight"] == [held]
    assert query(database_url, "SELECT schedule FROM syncworker.jobs WHERE name = 'tick'") == [
        (["* * * * * *"],)
    ]
    # The new schedule fires (every second) while the old run still runs.
    wait_until(
        lambda: (
            query(
                database_url,
                "SELECT count(*) >= 2 FROM syncworker.runs WHERE job = 'tick'"
                " AND source = 'cron' AND status = 'succeeded'",
            )
            == [(True,)]
        ),
        what="two fires of the new schedule",
    )
    assert query(
        database_url, "SELECT status, attempt FROM syncworker.runs WHERE id = %s", (held,)
    ) == [("running", 1)]
    release(database_url)
    wait_until(
        lambda: (
            query(
                database_url, "SELECT status, attempt FROM syncworker.runs WHERE id = %s", (held,)
            )
            == [("succeeded", 1)]
        ),
        what="the run that was in flight at the reload to finish",
    )
    assert daemon.stop() == 0


def test_a_bad_config_on_sighup_is_refused_and_the_running_one_kept(database_url, tmp_path, start):
    path = tmp_path / "c.toml"
    jobs = '[jobs.solo]\nsteps = ["sw_testjobs:record"]\n'
    daemon = start(write_config(path, database_url, jobs))

    bad_configs = [
        (jobs + 'schedule = "not cron"\n', "schedule"),
        ('[jobs.solo]\nsteps = ["sw_testjobs:no_such_step"]\n', "no_such_step"),
        (jobs.replace("[jobs.solo]", "[jobs.solo]\nretries = -1"), "retries"),
    ]
    for n, (text, named) in enumerate(bad_configs, start=1):
        write_config(path, database_url, text)
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_for("config_reload_failed", count=n)
        assert named in failed["error"], failed
        assert daemon.proc.poll() is None

    # A restart-only key is kept as it runs, and said so.
    write_config(path, database_url, jobs, channel="elsewhere")
    daemon.signal(signal.SIGHUP)
    reloaded = daemon.wait_for("config_reloaded")
    assert reloaded["restart_needed"] == ["channel"]
    # Still the old channel, the old job, the old step: all served.
    execute(database_url, "NOTIFY sync_trigger, 'solo'")
    wait_until(
        lambda: (
            query(database_url, "SELECT count(*) FROM syncworker.runs WHERE status = 'succeeded'")
            == [(1,)]
        ),
        what="a trigger on the running channel served",
    )
    assert daemon.stop() == 0


def test_finished_runs_older_than_history_days_are_pruned(database_url, tmp_path, start):
    jobs = '[jobs.solo]\nsteps = ["sw_testjobs:record"]\n\n[jobs.other]\nsteps = ["sw_testjobs:record"]\n'
    config = write_config(tmp_path / "c.toml", database_url, jobs, history_days=30)
    # Created by a first, short-lived worker with pruning off.
    keep_all = write_config(tmp_path / "keep.toml", database_url, jobs, history_days=0)
    start(keep_all).stop()
    execute(
        database_url,
        "INSERT INTO syncworker.runs (job, status, source, started_at, finished_at)"
        " SELECT 'solo', s, 'test', now() - interval '41 days', now() - interval '40 days'"
        " FROM unnest(ARRAY['succeeded', 'failed', 'cancelled', 'skipped']) AS s,"
        "      generate_series(1, 300);"
        # Old but the newest of its key: kept, so status still shows its last result.
        "INSERT INTO syncworker.runs (job, status, source, started_at, finished_at)"
        " VALUES ('other', 'failed', 'test', now() - interval '91 days', now() - interval '90 days');"
        # Recent ones: kept.
        "INSERT INTO syncworker.runs (job, status, source, started_at, finished_at)"
        " SELECT 'solo', 'succeeded', 'test', now() - interval '2 days', now() - interval '2 days'"
        " FROM generate_series(1, 5);"
        "INSERT INTO syncworker.run_steps (run_id, attempt, position, name, status)"
        " SELECT id, 1, 0, 'record', 'succeeded' FROM syncworker.runs WHERE job = 'solo'",
    )
    daemon = start(config)
    pruned = daemon.wait_for("history_pruned")
    assert pruned["deleted"] == 1200
    remaining = query(
        database_url,
        "SELECT job, status, finished_at > now() - interval '30 days', count(*)"
        " FROM syncworker.runs GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    assert remaining == [("other", "failed", False, 1), ("solo", "succeeded", True, 5)]
    assert query(database_url, "SELECT count(*) FROM syncworker.run_steps") == [(5,)]
    assert daemon.stop() == 0
