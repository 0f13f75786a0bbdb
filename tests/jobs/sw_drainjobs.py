"""Steps for tests/daemon/test_drain_kinds.py: each records its start and end in
test_log (the database at $SW_TEST_DATABASE_URL), with half a second between."""

from __future__ import annotations

import os
import time

import psycopg

from syncworker import SyncContext


def _log(run_id: int, step: str) -> None:
    with psycopg.connect(os.environ["SW_TEST_DATABASE_URL"], autocommit=True) as conn:
        conn.execute("INSERT INTO test_log (run_id, step) VALUES (%s, %s)", (run_id, step))


def plain_span(ctx: SyncContext) -> None:
    """A blocking function that never looks at ctx.stopping."""
    _log(ctx.run_id, "span_start")
    time.sleep(0.5)
    _log(ctx.run_id, "span_end")
