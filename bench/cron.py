"""Scenario 3: cron accuracy. A job scheduled every second; each run's step
stamps time.time_ns() at its first line; the delay is that stamp minus the
fire time the run was enqueued for (runs.scheduled_for)."""

from __future__ import annotations

import time

from bench.common import (
    Config,
    Probe,
    Row,
    Server,
    connect,
    start_syncworkers,
    stop_all,
    summary,
    syncworker_config,
    workdir,
)

JOBS = """
[jobs.tick]
schedule = "* * * * * *"
steps = ["bench.sw_steps:mark"]
"""


def run(server: Server, cfg: Config) -> list[Row]:
    url = server.fresh("bench_cron")
    with workdir("cron") as tmp:
        probe = Probe(tmp)
        config = syncworker_config(tmp / "sw.toml", url, JOBS)
        workers = start_syncworkers(1, config, tmp, probe)
        try:
            time.sleep(cfg.cron_seconds)
        finally:
            stop_all(workers)
            stamps = probe.drain()
            probe.close()
    with connect(url) as conn:
        fires = dict(
            conn.execute(
                "SELECT id, (extract(epoch FROM scheduled_for) * 1e9)::bigint"
                " FROM syncworker.runs WHERE scheduled_for IS NOT NULL"
            ).fetchall()
        )
        missed = conn.execute(
            "SELECT count(*) FROM syncworker.runs WHERE scheduled_for IS NOT NULL"
            " AND status <> 'succeeded'"
        ).fetchone()
    # The first fire is the worker's baseline, never run: every run is a fire.
    delays = [(s.ns - fires[s.ident]) / 1e6 for s in stamps if s.ident in fires]
    stats = summary(delays)
    detail = {**stats, "fires": len(fires), "not_succeeded": missed[0] if missed else None}
    return [
        Row("3 cron", "fire time -> step, p50", "ms", stats["p50"], detail=detail),
        Row("3 cron", "fire time -> step, p95", "ms", stats["p95"]),
        Row(
            "3 cron",
            "fire time -> step, p99",
            "ms",
            stats["p99"],
            target="<= 20 ms",
            met=stats["p99"] <= 20.0,
        ),
        Row("3 cron", "fire time -> step, max", "ms", stats["max"]),
    ]
