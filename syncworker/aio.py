"""Small asyncio helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for `event` up to `timeout` seconds; True if it is set.

    Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that
    arrives just as the event is set, which kept a stopping worker alive.
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], again_after: float = 0.5) -> None:
    """Cancel `tasks` and wait until every one has ended.

    A cancellation can be lost: on Python 3.11 `asyncio.wait_for`, which
    libraries use inside (psycopg_pool waits for a connection with it),
    swallows one that arrives just as its wait completes, and the task goes
    on. So a task still running after `again_after` seconds is cancelled again.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_after)
