"""A stop the event loop cannot act on ends the process with 70.

An `async def` step that blocks (time.sleep, a busy loop, a blocking driver)
holds the whole loop: SIGTERM's handler, the drain, the job's timeout and a
second signal all run on it, so none of them happens and the worker would
hang. A Python-level signal handler still runs between bytecodes, so it
notes the signal; a watchdog thread then waits for the loop, and if the loop
has not run for `drain_timeout` + CANCEL_GRACE + STALL_MARGIN after that,
logs `worker_loop_stalled` and exits 70 for the supervisor to restart it.
The exit releases the worker's liveness lock, and orphan recovery puts its
runs back (the next worker start, or any peer at once).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from structlog.typing import FilteringBoundLogger

from syncworker import runtime
from syncworker.exits import EX_SOFTWARE, real_exit

STALL_MARGIN = 5.0
_TICK = 0.5


class StallWatch:
    def __init__(self, log: FilteringBoundLogger, drain_timeout: Callable[[], float]) -> None:
        self._log = log
        self._drain_timeout = drain_timeout
        self._tick = time.monotonic()
        self._signalled = threading.Event()
        self._done = threading.Event()
        self._ticker: asyncio.Task[None] | None = None

    def start(self, signals: tuple[signal.Signals, ...]) -> None:
        """Call after loop.add_signal_handler: asyncio keeps dispatching
        through its wakeup fd, and this handler runs even with the loop stuck."""
        for sig in signals:
            signal.signal(sig, self._on_signal)
        self._ticker = asyncio.get_running_loop().create_task(self._ticks(), name="stall-ticker")
        threading.Thread(target=self._watch, name="syncworker-stall-watch", daemon=True).start()

    def close(self) -> None:
        self._done.set()
        self._signalled.set()  # let the watcher see it is over
        if self._ticker is not None:
            self._ticker.cancel()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled.set()

    async def _ticks(self) -> None:
        while True:
            self._tick = time.monotonic()
            await asyncio.sleep(_TICK)

    def _watch(self) -> None:
        self._signalled.wait()
        since = time.monotonic()
        while not self._done.is_set():
            limit = self._drain_timeout() + runtime.CANCEL_GRACE + STALL_MARGIN
            # From the later of the signal and the loop's last sign of life.
            stalled_at = max(since, self._tick)
            remaining = stalled_at + limit - time.monotonic()
            if remaining <= 0:
                self._exit(time.monotonic() - stalled_at)
            self._done.wait(remaining)

    def _exit(self, seconds: float) -> None:
        self._log.error(
            "worker_loop_stalled",
            seconds=round(seconds, 1),
            exit_code=EX_SOFTWARE,
            reason="a stop was requested and the event loop did not run (a blocking async step?)",
        )
        real_exit(EX_SOFTWARE)
