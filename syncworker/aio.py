"""Small asyncio helpers."""

from __future__ import annotations

import asyncio


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
