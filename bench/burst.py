"""Scenario 4: bursts of triggers.

One key: a run of the key is going (its step holds until released) while
10,000 triggers for the key arrive; they must make one pending run between
them, and the worker's memory must not grow with their number. Sent as
`syncworker.trigger()` calls (procrastinate: defers with a queueing lock
for the key) and, for syncworker, as raw NOTIFYs too, the path that runs
through the worker itself.

1,000 keys: 10,000 triggers round-robin over 1,000 scopes while the worker
drains them: runs created, the most pending runs any key had (sampled),
time to drain, RSS before and after.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    Config,
    Probe,
    Process,
    Row,
    Server,
    connect,
    start_procrastinates,
    start_syncworkers,
    stop_all,
    syncworker_config,
    wait_until,
    workdir,
)


def _jobs(keys: int) -> str:
    scopes = json.dumps([f"s{i:04d}" for i in range(keys)])
    return f"""
[jobs.one]
steps = ["bench.sw_steps:hold"]

[jobs.fan]
scopes = {scopes}
steps = ["bench.sw_steps:noop"]
"""


class Sampler:
    """Samples, every 50 ms from its own connection, the most pending runs
    (procrastinate: `todo` jobs) that any one key has."""

    def __init__(self, url: str, query: str) -> None:
        self.most = 0
        self._stop = threading.Event()
        self._url, self._query = url, query
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with connect(self._url) as conn:
            while not self._stop.wait(0.05):
                row = conn.execute(self._query.encode()).fetchone()
                self.most = max(self.most, int(row[0] or 0) if row else 0)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.most


def _drained(url: str, query: str, worker: Process, timeout: float = 300) -> None:
    def idle() -> bool:
        with connect(url) as conn:
            row = conn.execute(query.encode()).fetchone()
        return bool(row and row[0] == 0)

    wait_until(idle, timeout, "the burst to drain", worker, every=0.1)


# -- syncworker ------------------------------------------------------------------------

SW_ACTIVE = "SELECT count(*) FROM syncworker.runs WHERE status IN ('pending', 'running')"
SW_MOST_PENDING = (
    "SELECT max(n) FROM (SELECT count(*) AS n FROM syncworker.runs"
    " WHERE status = 'pending' GROUP BY job, scope) AS k"
)


def _sw_one_key(
    url: str, tmp: Path, probe: Probe, worker: Process, n: int, how: str
) -> dict[str, Any]:
    release = tmp / f"release-{how}"
    with connect(url) as conn:
        first_id = conn.execute(
            "SELECT run_id FROM syncworker.trigger('one', payload => %s)",
            (json.dumps({"release": str(release)}),),
        ).fetchone()
        assert first_id is not None
        while probe.get().ident != first_id[0]:
            pass  # the last round's follow-up run, which ended at once
        rss0 = worker.rss_mb()
        rss_tenth = rss0
        began = time.monotonic()
        for i in range(n):
            if how == "notify":
                conn.execute("NOTIFY sync_trigger, 'one'")
            else:
                conn.execute("SELECT * FROM syncworker.trigger('one')")
            if i + 1 == n // 10:
                rss_tenth = worker.rss_mb()
        sent = time.monotonic() - began

        def all_taken() -> bool:
            # Counted over the held run too: a trigger that came before its
            # claim was in (a reserved run starts first) joined it, and the
            # worker asked for a follow-up run for it.
            row = conn.execute(
                "SELECT coalesce(sum(triggers), 0) FROM syncworker.runs"
                " WHERE job = 'one' AND id >= %s",
                (first_id[0],),
            ).fetchone()
            return bool(row and row[0] >= n + 1)

        wait_until(all_taken, 120, f"the worker to take {n} triggers", worker, every=0.1)
        taken = time.monotonic() - began
        rss1 = worker.rss_mb()
        created = conn.execute(
            "SELECT count(*) FROM syncworker.runs WHERE job = 'one' AND id > %s",
            (first_id[0],),
        ).fetchone()
        released = time.time()
        release.touch()
        _drained(url, SW_ACTIVE, worker)
        done = conn.execute(
            "SELECT extract(epoch FROM max(finished_at)) FROM syncworker.runs WHERE job = 'one'"
        ).fetchone()
    return {
        "created": created[0] if created else None,
        "rss_before": rss0,
        "rss_tenth": rss_tenth,
        "rss_after": rss1,
        "send_s": sent,
        "taken_s": taken,
        "drain_ms": (float(done[0]) - released) * 1000 if done else None,
    }


def _sw_many_keys(url: str, worker: Process, n: int, keys: int) -> dict[str, Any]:
    with connect(url) as conn:
        before = conn.execute("SELECT coalesce(max(id), 0) FROM syncworker.runs").fetchone()
        rss0 = worker.rss_mb()
        sampler = Sampler(url, SW_MOST_PENDING)
        began_wall = time.time()
        for i in range(n):
            conn.execute("SELECT * FROM syncworker.trigger('fan', %s)", (f"s{i % keys:04d}",))
        _drained(url, SW_ACTIVE, worker)
        most = sampler.stop()
        assert before is not None
        row = conn.execute(
            "SELECT count(*), extract(epoch FROM max(finished_at))"
            " FROM syncworker.runs WHERE job = 'fan' AND id > %s",
            (before[0],),
        ).fetchone()
    assert row is not None
    return {
        "created": row[0],
        "most_pending_per_key": most,
        "drain_s": float(row[1]) - began_wall,
        "rss_before": rss0,
        "rss_after": worker.rss_mb(),
    }


def measure_syncworker(server: Server, cfg: Config) -> dict[str, Any]:
    url = server.fresh("bench_burst_sw")
    with workdir("burst") as tmp:
        probe = Probe(tmp)
        config = syncworker_config(tmp / "sw.toml", url, _jobs(cfg.burst_keys))
        [worker] = start_syncworkers(1, config, tmp, probe)
        try:
            return {
                "one_sql": _sw_one_key(url, tmp, probe, worker, cfg.burst_n, "sql"),
                "one_notify": _sw_one_key(url, tmp, probe, worker, cfg.burst_n, "notify"),
                "many": _sw_many_keys(url, worker, cfg.burst_n, cfg.burst_keys),
            }
        finally:
            stop_all([worker])
            probe.close()


# -- procrastinate -------------------------------------------------------------------

PC_ACTIVE = "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
PC_MOST_PENDING = (
    "SELECT max(n) FROM (SELECT count(*) AS n FROM procrastinate_jobs"
    " WHERE status = 'todo' GROUP BY queueing_lock) AS k"
)


def measure_procrastinate(server: Server, cfg: Config) -> dict[str, Any]:
    from procrastinate.exceptions import AlreadyEnqueued

    from bench.proc_app import make_app

    url = server.fresh("bench_burst_pc")
    app = make_app(url)
    loop = asyncio.new_event_loop()
    run: Callable[[Any], Any] = loop.run_until_complete
    with workdir("burst-pc") as tmp:
        probe = Probe(tmp)
        run(app.open_async())
        run(app.schema_manager.apply_schema_async())
        [worker] = start_procrastinates(1, url, tmp, probe)

        async def defer(task: str, key: str, **kwargs: Any) -> bool:
            try:
                await app.configure_task(task, queueing_lock=key, lock=key).defer_async(**kwargs)
            except AlreadyEnqueued:
                return False
            return True

        try:
            release = tmp / "release"
            run(defer("hold", "one", release=str(release)))
            probe.get()
            rss0 = worker.rss_mb()
            created = sum(run(defer("hold", "one")) for _ in range(cfg.burst_n))
            rss1 = worker.rss_mb()
            released = time.time()
            release.touch()
            _drained(url, PC_ACTIVE, worker)
            with connect(url) as conn:
                done = conn.execute(
                    "SELECT extract(epoch FROM max(at)) FROM procrastinate_events"
                    " WHERE type = 'succeeded'"
                ).fetchone()
                one = {
                    "created": created,
                    "rss_before": rss0,
                    "rss_after": rss1,
                    "drain_ms": (float(done[0]) - released) * 1000 if done else None,
                }
                last = conn.execute(
                    "SELECT coalesce(max(id), 0) FROM procrastinate_jobs"
                ).fetchone()
                rss0 = worker.rss_mb()
                sampler = Sampler(url, PC_MOST_PENDING)
                began_wall = time.time()
                for i in range(cfg.burst_n):
                    run(defer("noop", f"s{i % cfg.burst_keys:04d}"))
                _drained(url, PC_ACTIVE, worker)
                most = sampler.stop()
                assert last is not None
                row = conn.execute(
                    "SELECT count(*), (SELECT extract(epoch FROM max(at)) FROM procrastinate_events"
                    "  WHERE type = 'succeeded')"
                    " FROM procrastinate_jobs WHERE id > %s",
                    (last[0],),
                ).fetchone()
                assert row is not None
                many = {
                    "created": row[0],
                    "most_pending_per_key": most,
                    "drain_s": float(row[1]) - began_wall,
                    "rss_before": rss0,
                    "rss_after": worker.rss_mb(),
                }
        finally:
            stop_all([worker])
            run(app.close_async())
            loop.close()
            probe.close()
    return {"one": one, "many": many}


def run(server: Server, cfg: Config) -> list[Row]:
    sw = measure_syncworker(server, cfg)
    pc = measure_procrastinate(server, cfg)
    n, keys = f"{cfg.burst_n:,}", f"{cfg.burst_keys:,}"
    one_sql, one_notify, many = sw["one_sql"], sw["one_notify"], sw["many"]
    growth = one_notify["rss_after"] - one_notify["rss_tenth"]
    return [
        Row(
            "4 burst",
            f"1 key, {n} trigger() during a run: runs created",
            "runs",
            one_sql["created"],
            pc["one"]["created"],
            "1",
            one_sql["created"] == 1,
            {"syncworker": one_sql, "procrastinate": pc["one"]},
        ),
        Row(
            "4 burst",
            f"1 key, {n} NOTIFY during a run: runs created",
            "runs",
            one_notify["created"],
            None,
            "1",
            one_notify["created"] == 1,
            one_notify,
        ),
        Row(
            "4 burst",
            f"1 key: worker RSS before -> after {n} NOTIFY",
            "MB",
            f"{one_notify['rss_before']:.1f} -> {one_notify['rss_after']:.1f}",
            f"{pc['one']['rss_before']:.1f} -> {pc['one']['rss_after']:.1f}",
        ),
        Row(
            "4 burst",
            f"1 key: RSS growth from trigger {cfg.burst_n // 10:,} to {n}",
            "MB",
            growth,
            None,
            "< 2 MB",
            growth < 2.0,
        ),
        Row(
            "4 burst",
            f"1 key: {n} NOTIFY taken by the worker in",
            "s",
            one_notify["taken_s"],
        ),
        Row(
            "4 burst",
            "1 key: release -> all runs of the key done",
            "ms",
            one_sql["drain_ms"],
            pc["one"]["drain_ms"],
        ),
        Row(
            "4 burst",
            f"{keys} keys, {n} triggers: runs created",
            "runs",
            many["created"],
            pc["many"]["created"],
        ),
        Row(
            "4 burst",
            f"{keys} keys: most pending runs of one key (sampled)",
            "runs",
            many["most_pending_per_key"],
            pc["many"]["most_pending_per_key"],
            "<= 1",
            many["most_pending_per_key"] <= 1,
        ),
        Row(
            "4 burst",
            f"{keys} keys: first trigger -> all done",
            "s",
            many["drain_s"],
            pc["many"]["drain_s"],
            detail={"syncworker": many, "procrastinate": pc["many"]},
        ),
        Row(
            "4 burst",
            f"{keys} keys: worker RSS before -> after",
            "MB",
            f"{many['rss_before']:.1f} -> {many['rss_after']:.1f}",
            f"{pc['many']['rss_before']:.1f} -> {pc['many']['rss_after']:.1f}",
        ),
    ]
