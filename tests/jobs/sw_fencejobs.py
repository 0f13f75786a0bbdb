"""Steps that record when they execute, for the self-fencing tests.

Each appends `<pid> <attempt> <unix time>` to payload['file'] when it starts,
every 20 ms while it works and when it ends; it works for payload['first']
seconds on attempt 1 and payload['then'] seconds on later ones. The lines of
one (pid, attempt) span the interval it executed; the test asserts that no
two intervals overlap. Run as a script, it is the command-step variant (the
payload comes from SYNCWORKER_PAYLOAD).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from syncworker import SyncContext

TICK = 0.02


def _mark(path: str, attempt: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {attempt} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


def _seconds(payload: dict[str, Any], attempt: int) -> float:
    return float(payload["first"] if attempt == 1 else payload["then"])


async def ticking_async(ctx: SyncContext) -> None:
    import asyncio

    path, end = ctx.payload["file"], time.monotonic() + _seconds(ctx.payload, ctx.attempt)
    while time.monotonic() < end:
        _mark(path, ctx.attempt)
        await asyncio.sleep(TICK)
    _mark(path, ctx.attempt)


def ticking_plain(ctx: SyncContext) -> None:
    _tick_blocking(ctx.payload, ctx.attempt)


def _tick_blocking(payload: dict[str, Any], attempt: int) -> None:
    path, end = payload["file"], time.monotonic() + _seconds(payload, attempt)
    while time.monotonic() < end:
        _mark(path, attempt)
        time.sleep(TICK)
    _mark(path, attempt)


def cpu_bound(n: int) -> int:
    """A call-heavy CPU-bound function: the worst case for a profile hook."""
    return n if n < 2 else cpu_bound(n - 1) + cpu_bound(n - 2)


if __name__ == "__main__":
    _tick_blocking(
        json.loads(os.environ["SYNCWORKER_PAYLOAD"]), int(os.environ["SYNCWORKER_ATTEMPT"])
    )
    sys.exit(0)
