"""History pruning (pruning.py) against a real database: what it keeps, and
that a pass progresses under a statement_timeout its first windows exceed."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg

from syncworker.config import JobConfig
from syncworker.db import Store
from syncworker.logs import make_logger
from syncworker.pruning import prune_pass
from tests.harness import execute, query

# 20,000 old runs over a scoped job (3 scopes) and an unscoped one, each with
# a step; then, per key, a newer old run (the newest: kept however old), and
# recent runs (kept).
HISTORY = """
INSERT INTO syncworker.runs (job, scope, status, source, started_at, finished_at)
SELECT CASE WHEN g % 4 = 0 THEN 'solo' ELSE 'sync' END,
       CASE WHEN g % 4 = 0 THEN NULL ELSE (ARRAY['A', 'B', 'C'])[g % 4] END,
       (ARRAY['succeeded', 'failed', 'cancelled', 'skipped'])[1 + g % 3], 'test',
       now() - interval '61 days', now() - interval '60 days'
FROM generate_series(1, 20000) g;
INSERT INTO syncworker.runs (job, scope, status, source, started_at, finished_at)
SELECT job, scope, 'failed', 'test', now() - interval '51 days', now() - interval '50 days'
FROM (VALUES ('solo', NULL), ('sync', 'A'), ('sync', 'B'), ('sync', 'C')) AS k(job, scope);
INSERT INTO syncworker.runs (job, scope, status, source, started_at, finished_at)
SELECT 'sync', 'A', 'succeeded', 'test', now() - interval '1 day', now() - interval '1 day'
FROM generate_series(1, 7);
INSERT INTO syncworker.run_steps (run_id, attempt, position, name, status)
SELECT id, 1, 0, 'record', 'succeeded' FROM syncworker.runs;
"""

JOBS = {
    "sync": JobConfig(scopes=("A", "B", "C"), steps=["sw_testjobs:record"]),
    "solo": JobConfig(steps=["sw_testjobs:record"]),
}


async def _prune(url: str, statement_timeout: str, log: io.StringIO | None = None) -> int:
    store = Store("syncworker", "sync_events")
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await store.setup(conn, JOBS, "test")
        execute(url, HISTORY)
        await conn.execute(
            "SELECT set_config('statement_timeout', %s, false)", (statement_timeout,)
        )

        @asynccontextmanager
        async def connect() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
            yield conn

        logger = make_logger("info", "json", stream=log or io.StringIO())
        return await prune_pass(store, connect, logger, 30)


def _left(url: str) -> list[tuple[Any, ...]]:
    return query(
        url,
        "SELECT job, scope, finished_at > now() - interval '30 days', count(*)"
        " FROM syncworker.runs GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )


KEPT = [
    ("solo", None, False, 1),
    ("sync", "A", True, 7),
    ("sync", "B", False, 1),
    ("sync", "C", False, 1),
]


def test_a_pass_keeps_the_recent_runs_and_the_newest_of_each_key(database_url) -> None:
    assert asyncio.run(_prune(database_url, "0")) == 20_001
    assert _left(database_url) == KEPT
    [(steps,)] = query(database_url, "SELECT count(*) FROM syncworker.run_steps")
    assert steps == 10


def test_a_pass_narrows_its_windows_under_a_statement_timeout(database_url) -> None:
    """The first window (5,000 ids, with their steps) takes longer than the
    timeout: the pass narrows and goes on, rather than failing every hour."""
    log = io.StringIO()
    assert asyncio.run(_prune(database_url, "25ms", log)) == 20_001
    assert _left(database_url) == KEPT
    events = [json.loads(line)["event"] for line in log.getvalue().splitlines()]
    assert "history_prune_narrowed" in events
