"""Steps that misbehave the way real code does: blocking threads, swallowed
cancellations, sys.exit and os._exit. Each records when it executed, so the
tests can check that no two executions overlapped and nothing ran after a kill.

Records go to `step_span` (run_id, pid, what, at) through a connection of
the step's own; plain functions, which cannot use ctx.connection(), append
JSON lines to the file named by payload['file'].
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import psycopg

from syncworker import SyncContext

SPAN_SQL = """
CREATE TABLE IF NOT EXISTS step_span (
    id bigserial PRIMARY KEY, run_id bigint, pid int, what text,
    at timestamptz DEFAULT clock_timestamp());
"""


def _note(ctx: SyncContext, what: str) -> None:
    with open(ctx.payload["file"], "a") as out:
        line = {
            "run_id": ctx.run_id,
            "attempt": ctx.attempt,
            "what": what,
            "at": time.time(),
            "pid": os.getpid(),
        }
        out.write(json.dumps(line) + "\n")


async def _record(ctx: SyncContext, what: str) -> None:
    async with ctx.connection() as conn:
        await conn.execute(
            "INSERT INTO step_span (run_id, pid, what) VALUES (%s, %s, %s)",
            (ctx.run_id, os.getpid(), what),
        )


def blocking_span(ctx: SyncContext) -> None:
    """A plain function that blocks for payload['seconds'], noting its start
    and when its thread's code ends (a given-up step is stopped as the
    blocking call returns: "end" is then noted on the way out)."""
    _note(ctx, "start")
    try:
        time.sleep(float(ctx.payload.get("seconds", 3)))
    finally:
        _note(ctx, "end")


async def swallow(ctx: SyncContext) -> None:
    """Swallows every cancellation and goes on for payload['seconds'] (default 600)."""
    await _record(ctx, "start")
    loop = asyncio.get_running_loop()
    until = loop.time() + float(ctx.payload.get("seconds", 600))
    while loop.time() < until:
        try:
            await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            ctx.log.info("cancellation_swallowed")


async def blocks_the_loop(ctx: SyncContext) -> None:
    """An async step that blocks the whole loop (time.sleep, not asyncio.sleep)."""
    await _record(ctx, "start")
    time.sleep(float(ctx.payload.get("seconds", 600)))  # noqa: ASYNC251


async def calls_sys_exit(ctx: SyncContext) -> None:
    await _record(ctx, "start")
    sys.exit(0)


async def sys_exit_from_a_callback(ctx: SyncContext) -> None:
    """sys.exit(0) raised by a callback the step scheduled: out of the loop itself."""
    await _record(ctx, "start")
    asyncio.get_running_loop().call_soon(sys.exit, 0)
    await asyncio.sleep(5)


def calls_sys_exit_in_thread(ctx: SyncContext) -> None:
    sys.exit(3)


async def calls_os_exit(ctx: SyncContext) -> None:
    """os._exit(0) the first time it runs for a run, succeeds after."""
    async with ctx.connection() as conn:
        cur = await conn.execute(
            "SELECT 1 FROM step_span WHERE run_id = %s AND what = 'exiting'", (ctx.run_id,)
        )
        again = await cur.fetchone() is not None
    if not again:
        await _record(ctx, "exiting")
        os._exit(0)
    await _record(ctx, "done")


async def ticking(ctx: SyncContext) -> None:
    """In a child process (isolation = "process"): records its pid, then a
    tick every 0.1 s for payload['seconds'] (default 600), counting each."""
    await _record(ctx, "start")
    ctx.log.info("ticking_started", pid=os.getpid())
    ctx.total(1000)
    loop = asyncio.get_running_loop()
    until = loop.time() + float(ctx.payload.get("seconds", 600))
    while loop.time() < until:
        if ctx.payload.get("cooperative") and ctx.stopping.is_set():
            await _record(ctx, "stopped early")
            return
        await _record(ctx, "tick")
        ctx.count(processed=1)
        await asyncio.sleep(0.1)
    await _record(ctx, "end")


def ticking_plain(ctx: SyncContext) -> None:
    """A plain function in a child process: blocks, ignoring everything."""
    url = os.environ["SW_TEST_URL"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO step_span (run_id, pid, what) VALUES (%s, %s, 'start')",
            (ctx.run_id, os.getpid()),
        )
        while True:
            conn.execute(
                "INSERT INTO step_span (run_id, pid, what) VALUES (%s, %s, 'tick')",
                (ctx.run_id, os.getpid()),
            )
            time.sleep(0.1)


def context_of(ctx: SyncContext) -> dict[str, Any]:
    return {
        "run_id": ctx.run_id,
        "job": ctx.job,
        "scope": ctx.scope,
        "source": ctx.source,
        "triggered_by": ctx.triggered_by,
        "payload": ctx.payload,
        "attempt": ctx.attempt,
    }


async def report_context(ctx: SyncContext) -> None:
    """In a child process: records what its context says, logs, counts."""
    async with ctx.connection() as conn:
        await conn.execute(
            "INSERT INTO step_span (run_id, pid, what) VALUES (%s, %s, %s)",
            (ctx.run_id, os.getpid(), json.dumps(context_of(ctx))),
        )
    ctx.log.info("from_child", pid=os.getpid())
    ctx.total(10)
    ctx.count(inserted=2, updated=3)


def fails_in_child(ctx: SyncContext) -> None:
    raise ValueError("broken in the child")
