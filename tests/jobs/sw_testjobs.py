"""Steps the integration tests run through a real daemon.

Each step records what it saw in `test_log` so tests can assert on rows; the
test drives them through the trigger payload and the `test_release` channel.
"""

from __future__ import annotations

import time

from syncworker import SyncContext

SETUP_SQL = """
CREATE TABLE IF NOT EXISTS test_log (
    id bigserial PRIMARY KEY,
    run_id bigint, job text, scope text, step text, attempt int, source text,
    payload jsonb, at timestamptz DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS test_release (name text PRIMARY KEY);
"""


async def _log(ctx: SyncContext, step: str) -> None:
    from psycopg.types.json import Jsonb

    async with ctx.connection() as conn:
        await conn.execute(
            "INSERT INTO test_log (run_id, job, scope, step, attempt, source, payload)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (ctx.run_id, ctx.job, ctx.scope, step, ctx.attempt, ctx.source, Jsonb(ctx.payload)),
        )


async def record(ctx: SyncContext) -> None:
    """Log, count, and fail when asked: payload fail_times=N fails attempts 1..N;
    scope 'BAD' always fails."""
    await _log(ctx, "record")
    ctx.total(10)
    ctx.count(inserted=3, updated=7)
    if ctx.scope == "BAD":
        raise RuntimeError("scope BAD is broken")
    if ctx.attempt <= int(ctx.payload.get("fail_times", 0)):
        raise ValueError(f"failing attempt {ctx.attempt} on purpose")


async def second(ctx: SyncContext) -> None:
    await _log(ctx, "second")


def plain(ctx: SyncContext) -> None:
    """A blocking function: runs in a thread."""
    ctx.count(processed=1)


async def wait_release(ctx: SyncContext) -> None:
    """Block until the test inserts a row named after the scope (or 'all') into
    test_release and notifies test_release; ignores drain requests."""
    await _log(ctx, "wait_release")
    name = ctx.scope or "all"
    async with ctx.connection() as conn:
        await conn.execute("LISTEN test_release")
        try:
            while True:
                cur = await conn.execute(
                    "SELECT 1 FROM test_release WHERE name IN (%s, 'all')", (name,)
                )
                if await cur.fetchone():
                    break
                async for _ in conn.notifies(timeout=5.0):
                    break
        finally:
            await conn.execute("UNLISTEN test_release")
    await _log(ctx, "released")


def stuck(ctx: SyncContext) -> None:
    """A blocking step that ignores cancellation and drain."""
    time.sleep(600)


async def slow(ctx: SyncContext) -> None:
    """Sleeps for payload['seconds'] (default 30), cooperatively."""
    import asyncio

    await _log(ctx, "slow")
    await asyncio.sleep(float(ctx.payload.get("seconds", 30)))


async def cooperative(ctx: SyncContext) -> None:
    """Works until a drain is requested, then stops at a safe point."""
    await _log(ctx, "cooperative")
    await ctx.stopping.wait()
    await _log(ctx, "stopped early")


async def span(ctx: SyncContext) -> None:
    """Logs its start and end around payload['ms'] (default 20) milliseconds of
    work, so tests can check that no two runs of a key ever overlapped."""
    import asyncio

    await _log(ctx, "span_start")
    await asyncio.sleep(float(ctx.payload.get("ms", 20)) / 1000)
    await _log(ctx, "span_end")


async def progress(ctx: SyncContext) -> None:
    """Counts payload['chunks'] (default 5) chunks of payload['size'] (default
    2000) records against a known total, pausing payload['pause'] (default
    0.6) seconds after each, so the run's progress can be watched."""
    import asyncio

    chunks = int(ctx.payload.get("chunks", 5))
    size = int(ctx.payload.get("size", 2000))
    ctx.total(chunks * size)
    for _ in range(chunks):
        ctx.count(processed=size)
        await asyncio.sleep(float(ctx.payload.get("pause", 0.6)))


async def burst(ctx: SyncContext) -> None:
    """Counts 10,000 records one at a time over payload['seconds'] (default
    2.5) seconds: far more changes than progress events may report."""
    import asyncio

    ctx.total(10_000)
    pause = float(ctx.payload.get("seconds", 2.5)) / 100
    for i in range(10_000):
        ctx.count(processed=1)
        if i % 100 == 99:
            await asyncio.sleep(pause)


def heap(ctx: SyncContext) -> None:
    """Counts the objects the process's collector has been told to skip
    (gc.freeze): what the daemon did to its heap, seen from a step."""
    import gc

    ctx.count(processed=gc.get_freeze_count())


async def scheduled(ctx: SyncContext) -> None:
    """Records the cron fire it runs for (ctx.scheduled_for), or 'none'."""
    await _log(ctx, ctx.scheduled_for.isoformat() if ctx.scheduled_for else "none")
