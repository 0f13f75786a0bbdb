"""Small asyncio helpers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable, Iterator
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


class InFlight:
    """How many operations of one kind are under way, and a wait for none.

    For work that cannot be cancelled halfway without losing what it did
    (a claim whose commit makes a run ours): a stop waits for it instead.
    """

    def __init__(self) -> None:
        self._count = 0
        self._none = asyncio.Event()
        self._none.set()

    def __len__(self) -> int:
        return self._count

    def start(self) -> Callable[[], None]:
        """Count one from now (not from when a task spawned for it first
        runs); the returned function ends it, once however often called."""
        self._count += 1
        self._none.clear()
        ended = False

        def end() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            self._count -= 1
            if self._count == 0:
                self._none.set()

        return end

    def follow(self, future: asyncio.Future[Any]) -> None:
        """Count one from now until `future` is done."""
        end = self.start()
        future.add_done_callback(lambda _: end())

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        end = self.start()
        try:
            yield
        finally:
            end()

    async def settled(self) -> None:
        """Return once nothing is in flight."""
        await self._none.wait()


class Background:
    """Fire-and-forget tasks (a release, a deferred enqueue, a claim on a
    pooled connection), held so that asyncio does not collect them
    mid-flight, and cancellable together at the end."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel(self) -> None:
        await cancel_and_wait(list(self._tasks))


def consume(future: asyncio.Future[Any]) -> None:
    """Mark a future's outcome as seen (awaited on success only elsewhere):
    asyncio then never warns that its exception was not retrieved."""
    if not future.cancelled():
        future.exception()
