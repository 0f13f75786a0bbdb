"""Scenario: history pruning (pruning.py) of a big table, as a worker's
hourly pass runs it: runs/s deleted from a table of `prune_runs` runs (each
with one step) all past `history_days`, the same under a 150 ms
statement_timeout, and the time of a pass over the same table when nothing
is due. syncworker only: procrastinate keeps no run history to prune.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg

from bench.common import Config, Row, Server
from syncworker.config import JobConfig
from syncworker.db import Store
from syncworker.logs import make_logger
from syncworker.pruning import prune_pass

# `age` old at the first run, one second apart: all due when age > 30 days
# plus the table's span, none when it is younger than history_days.
_BUILD = """
INSERT INTO syncworker.runs
    (job, scope, status, source, requested_at, started_at, finished_at, duration_ms)
SELECT CASE WHEN g %% 11 = 0 THEN 'solo' ELSE 'sync' END,
       CASE WHEN g %% 11 = 0 THEN NULL ELSE chr(65 + g %% 10) END,
       CASE WHEN g %% 50 = 0 THEN 'failed' ELSE 'succeeded' END, 'cron',
       now() - %(age)s::interval + g * interval '1 second',
       now() - %(age)s::interval + g * interval '1 second',
       now() - %(age)s::interval + g * interval '1 second' + interval '1 second', 1000
FROM generate_series(1, %(n)s) g
"""
_STEPS = """
INSERT INTO syncworker.run_steps (run_id, attempt, position, name, status, started_at, finished_at)
SELECT id, 1, 0, 'step', 'succeeded', started_at, finished_at FROM syncworker.runs
"""

JOBS = {
    "sync": JobConfig(scopes=tuple("ABCDEFGHIJ"), steps=["bench.sw_steps:noop"]),
    "solo": JobConfig(steps=["bench.sw_steps:noop"]),
}


async def _pass(url: str, n: int, age: str, statement_timeout: str) -> tuple[int, float]:
    store = Store("syncworker", "sync_events")
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await store.setup(conn, JOBS, "bench")
        await conn.execute("TRUNCATE syncworker.runs CASCADE")
        await conn.execute(_BUILD, {"n": n, "age": age})
        await conn.execute(_STEPS)
        await conn.execute("VACUUM ANALYZE syncworker.runs")
        await conn.execute("VACUUM ANALYZE syncworker.run_steps")
        await conn.execute(
            "SELECT set_config('statement_timeout', %s, false)", (statement_timeout,)
        )

        @asynccontextmanager
        async def connect() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
            yield conn

        began = time.perf_counter()
        deleted = await prune_pass(store, connect, make_logger("warning", "json"), 30)
        return deleted, time.perf_counter() - began


def run(server: Server, cfg: Config) -> list[Row]:
    n = 100_000 if cfg.quick else 1_000_000
    url = server.fresh("bench_prune")
    rows = []
    for label, timeout in (("", "0"), (" (statement_timeout 150ms)", "150ms")):
        deleted, seconds = asyncio.run(_pass(url, n, "100 days", timeout))
        rows.append(
            Row("prune", f"runs deleted/s, {n:,} due{label}", "runs/s", round(deleted / seconds))
        )
    _, seconds = asyncio.run(_pass(url, n, "10 days", "0"))
    rows.append(Row("prune", f"pass over {n:,} runs, none due", "s", round(seconds, 2)))
    return rows
