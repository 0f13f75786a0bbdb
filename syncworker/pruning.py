"""Deleting finished runs older than `history_days`, in id windows.

One pass walks the runs table by id, a window at a time, from the oldest
row to the newest that existed when the pass began. Each statement looks
only at its window of ids (a range scan of the primary key), so its work is
bounded whatever the table holds, and no statement rescans the rows an
earlier one looked at or deleted: on a 1,000,000-run table the old
"first 500 matching rows" query took minutes per batch. The window grows
while statements are quick and shrinks when one is slow or hits a
`statement_timeout`, so a pass always progresses under one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker.db import Store

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]

# Ids per statement: where a pass starts, and its bounds.
SPAN_START = 5_000
SPAN_MIN = 50
SPAN_MAX = 100_000
# A statement quicker than FAST doubles the window, one slower than SLOW
# halves it: each stays well under any sensible statement_timeout, and
# triggers and claims get the database in between.
FAST = 0.1
SLOW = 0.5


async def prune_pass(store: Store, connect: Connect, log: FilteringBoundLogger, days: float) -> int:
    """Delete what is due; returns how many runs were deleted."""
    async with connect() as conn:
        top = await store.max_run_id(conn)
    after, span, deleted = 0, SPAN_START, 0
    ceiling = SPAN_MAX  # lowered below a window that was cancelled, for the pass
    while after < top:
        until = min(after + span, top)
        started = time.monotonic()
        try:
            async with connect() as conn:
                deleted += await store.prune_history(conn, days, after, until)
        except psycopg.errors.QueryCanceled:
            # A statement_timeout (or a cancel by an operator): smaller windows.
            if span <= SPAN_MIN:
                raise
            ceiling = max(SPAN_MIN, span // 2)
            span = max(SPAN_MIN, span // 4)
            log.info("history_prune_narrowed", span=span, reason="statement cancelled")
            continue
        after = until
        took = time.monotonic() - started
        if took < FAST:
            span = min(ceiling, span * 2)
        elif took > SLOW:
            span = max(SPAN_MIN, span // 2)
        await asyncio.sleep(0)  # let triggers and claims in between
    return deleted
