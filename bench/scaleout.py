"""Scenario 5: scale-out. 1,000 runs of a no-op job (one per scope; for
procrastinate, 1,000 no-op jobs deferred in one batch) drained by 1, 2 and 4
workers of concurrency 1: runs per second, from the request to the last run's
end (both read from the database's own timestamps)."""

from __future__ import annotations

import asyncio
import json

from bench.common import (
    Config,
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

WORKERS = (1, 2, 4)


def _sw_rate(server: Server, cfg: Config, n: int) -> float:
    url = server.fresh(f"bench_scale_sw_{n}")
    scopes = json.dumps([f"s{i:04d}" for i in range(cfg.scale_runs)])
    jobs = f'[jobs.fan]\nscopes = {scopes}\nsteps = ["bench.sw_steps:noop"]\n'
    with workdir("scale") as tmp:
        config = syncworker_config(tmp / "sw.toml", url, jobs)
        workers = start_syncworkers(n, config, tmp)
        try:
            with connect(url) as conn:
                conn.execute("SELECT * FROM syncworker.trigger('fan')")

                def done() -> bool:
                    row = conn.execute(
                        "SELECT count(*) FROM syncworker.runs WHERE status <> 'succeeded'"
                    ).fetchone()
                    return bool(row and row[0] == 0)

                wait_until(done, 300, "the runs to finish", *workers, every=0.1)
                row = conn.execute(
                    "SELECT count(*), extract(epoch FROM max(finished_at) - min(requested_at))"
                    " FROM syncworker.runs"
                ).fetchone()
        finally:
            stop_all(workers)
    assert row is not None
    return float(row[0]) / float(row[1])


def _pc_rate(server: Server, cfg: Config, n: int) -> float:
    from bench.proc_app import make_app

    url = server.fresh(f"bench_scale_pc_{n}")
    app = make_app(url)
    loop = asyncio.new_event_loop()
    with workdir("scale-pc") as tmp:
        loop.run_until_complete(app.open_async())
        loop.run_until_complete(app.schema_manager.apply_schema_async())
        workers = start_procrastinates(n, url, tmp)
        try:
            noop = app.configure_task("noop")
            loop.run_until_complete(noop.batch_defer_async(*({} for _ in range(cfg.scale_runs))))
            with connect(url) as conn:

                def done() -> bool:
                    row = conn.execute(
                        "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'"
                    ).fetchone()
                    return bool(row and row[0] == 0)

                wait_until(done, 300, "the jobs to finish", *workers, every=0.1)
                row = conn.execute(
                    "SELECT count(DISTINCT job_id) FILTER (WHERE type = 'succeeded'),"
                    " extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded')"
                    "                  - min(at) FILTER (WHERE type = 'deferred'))"
                    " FROM procrastinate_events"
                ).fetchone()
        finally:
            stop_all(workers)
            loop.run_until_complete(app.close_async())
            loop.close()
    assert row is not None
    return float(row[0]) / float(row[1])


def run(server: Server, cfg: Config) -> list[Row]:
    sw = {n: _sw_rate(server, cfg, n) for n in WORKERS}
    pc = {n: _pc_rate(server, cfg, n) for n in WORKERS}
    rows = [
        Row("5 scale-out", f"{n} worker{'s' if n > 1 else ''}: runs/s", "runs/s", sw[n], pc[n])
        for n in WORKERS
    ]
    rows.append(
        Row(
            "5 scale-out",
            "growth 1 -> 2 workers",
            "x",
            sw[2] / sw[1],
            pc[2] / pc[1],
            ">= 1.6x",
            sw[2] / sw[1] >= 1.6,
        )
    )
    rows.append(Row("5 scale-out", "growth 1 -> 4 workers", "x", sw[4] / sw[1], pc[4] / pc[1]))
    return rows
