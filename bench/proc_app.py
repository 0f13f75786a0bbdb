"""The procrastinate app the comparison runs: the same three tasks as
bench/sw_steps.py, and BENCH_PROC_PERIODIC yearly periodic tasks for the idle
scenario (the counterpart of syncworker's cron jobs that do not fire)."""

from __future__ import annotations

import asyncio
import os
import time

from procrastinate import App, JobContext, PsycopgConnector

from bench.stamp import stamp


async def mark(context: JobContext) -> None:
    now = time.time_ns()
    assert context.job.id is not None
    stamp("start", context.job.id, now)


async def noop() -> None:
    pass


async def hold(context: JobContext, release: str | None = None) -> None:
    now = time.time_ns()
    assert context.job.id is not None
    stamp("start", context.job.id, now)
    # A stat every 20 ms: the bench's stand-in for work that takes a while.
    while release:
        if os.path.exists(release):  # noqa: ASYNC240
            break
        await asyncio.sleep(0.02)


async def yearly(timestamp: int) -> None:
    pass


def make_app(dsn: str, periodic: int = 0) -> App:
    app = App(connector=PsycopgConnector(conninfo=dsn))
    app.task(name="mark", pass_context=True)(mark)
    app.task(name="noop")(noop)
    app.task(name="hold", pass_context=True)(hold)
    for i in range(periodic):
        task = app.task(name=f"yearly{i}")(yearly)
        app.periodic(cron="0 0 1 1 *", periodic_id=f"y{i}")(task)
    return app


app = make_app(
    os.environ.get("BENCH_PROC_DSN", ""), int(os.environ.get("BENCH_PROC_PERIODIC", "0"))
)
