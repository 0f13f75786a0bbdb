"""The asyncio helpers, against real tasks and events."""

from __future__ import annotations

import asyncio

from syncworker.aio import cancel_and_wait, wait_event


def test_cancel_and_wait_ends_a_task_that_swallowed_a_cancellation():
    async def main() -> int:
        swallowed = 0

        async def stubborn() -> None:
            nonlocal swallowed
            while True:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    if swallowed:
                        raise
                    swallowed += 1  # as asyncio.wait_for on 3.11 may do once

        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        await cancel_and_wait([task], again_after=0.01)
        assert task.cancelled()
        return swallowed

    assert asyncio.run(main()) == 1


def test_wait_event_reports_set_or_timeout():
    async def main() -> tuple[bool, bool]:
        event = asyncio.Event()
        timed_out = await wait_event(event, 0.01)
        asyncio.get_running_loop().call_soon(event.set)
        was_set = await wait_event(event, 5)
        return timed_out, was_set

    assert asyncio.run(main()) == (False, True)
