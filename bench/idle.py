"""Scenario 2: what an idle worker costs, with 1 and with 50 jobs scheduled
(yearly cron jobs, or procrastinate periodic tasks, that do not fire within
the window): CPU seconds (user + system, psutil) over the window, as a
percentage of one core, and RSS at its end.

The four workers idle side by side, each on its own database: an idle
process's CPU time is its own, whatever runs next to it, and this keeps the
whole scenario to one window.
"""

from __future__ import annotations

import asyncio
import time

from bench.common import (
    Config,
    Process,
    Row,
    Server,
    start_procrastinates,
    start_syncworkers,
    stop_all,
    syncworker_config,
    workdir,
)

# Settle after start: imports, migrations and the first scheduler pass are
# start-up cost, not idle cost.
SETTLE = 5.0


def _jobs(n: int) -> str:
    return "".join(
        f'\n[jobs.yearly{i}]\nschedule = "0 0 1 1 *"\nsteps = ["bench.sw_steps:noop"]\n'
        for i in range(n)
    )


def _apply_procrastinate_schema(url: str) -> None:
    from bench.proc_app import make_app

    async def apply() -> None:
        app = make_app(url)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    asyncio.run(apply())


def run(server: Server, cfg: Config) -> list[Row]:
    counts = (1, 50)
    workers: dict[tuple[str, int], Process] = {}
    with workdir("idle") as tmp:
        try:
            for n in counts:
                url = server.fresh(f"bench_idle_sw_{n}")
                config = syncworker_config(tmp / f"sw{n}.toml", url, _jobs(n))
                [workers["syncworker", n]] = start_syncworkers(1, config, tmp, tag=f"sw{n}")
                url = server.fresh(f"bench_idle_pc_{n}")
                _apply_procrastinate_schema(url)
                [workers["procrastinate", n]] = start_procrastinates(
                    1, url, tmp, periodic=n, tag=f"pc{n}"
                )
            time.sleep(SETTLE if not cfg.quick else 2.0)
            began = time.monotonic()
            cpu0 = {k: w.cpu_seconds() for k, w in workers.items()}
            time.sleep(cfg.idle_seconds)
            wall = time.monotonic() - began
            cpu = {k: w.cpu_seconds() - cpu0[k] for k, w in workers.items()}
            rss = {k: w.rss_mb() for k, w in workers.items()}
        finally:
            stop_all(list(workers.values()))
    rows = []
    for n in counts:
        sw_cpu = cpu["syncworker", n] / wall * 100
        pc_cpu = cpu["procrastinate", n] / wall * 100
        detail = {
            "window_s": round(wall, 1),
            "cpu_seconds": {
                "syncworker": cpu["syncworker", n],
                "procrastinate": cpu["procrastinate", n],
            },
        }
        rows.append(
            Row(
                "2 idle",
                f"CPU, {n} job{'s' if n > 1 else ''} scheduled",
                "% of a core",
                sw_cpu,
                pc_cpu,
                "< 0.1 %",
                sw_cpu < 0.1,
                detail,
            )
        )
        rows.append(
            Row(
                "2 idle",
                f"RSS, {n} job{'s' if n > 1 else ''} scheduled",
                "MB",
                rss["syncworker", n],
                rss["procrastinate", n],
                "< 60 MB",
                rss["syncworker", n] < 60,
            )
        )
    return rows
