"""The steps the bench's syncworker jobs run."""

from __future__ import annotations

import asyncio
import os
import time

from bench.stamp import stamp
from syncworker import SyncContext


async def mark(ctx: SyncContext) -> None:
    """Stamps the time of its first line: the end of a latency sample."""
    now = time.time_ns()
    stamp("start", ctx.run_id, now)


async def noop(ctx: SyncContext) -> None:
    """Nothing: what is measured is the worker's own cost per run."""


async def hold(ctx: SyncContext) -> None:
    """Stamps its start, then holds its key until the file payload["release"]
    exists: a run "that is going" while a burst arrives, or one to kill the
    worker under. Without it (a coalesced follow-up run), ends at once."""
    now = time.time_ns()
    stamp("start", ctx.run_id, now)
    release = ctx.payload.get("release")
    # A stat every 20 ms: the bench's stand-in for work that takes a while.
    while release:
        if os.path.exists(release):  # noqa: ASYNC240
            break
        await asyncio.sleep(0.02)
