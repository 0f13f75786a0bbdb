"""The worker's lifecycle, shared by every service: the events of its
phases (start -> serve -> drain -> stop, in daemon/worker.py) and what a
probe is told about them (health()).

Each event has one writer: `stopping` and `force` the worker's stop(),
`ready` and `db_up` the listener's connection state (worker._on_db_state).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol


class Service(Protocol):
    """A long-running loop of the worker: runs until cancelled."""

    async def run(self) -> None: ...


class Lifecycle:
    def __init__(self, drain_timeout: Callable[[], float]) -> None:
        """`drain_timeout` is read when the drain begins: a reload may change it."""
        self.stopping = asyncio.Event()  # a stop was asked: drain
        self.force = asyncio.Event()  # a second one: cancel at once
        self.ready = asyncio.Event()  # listening: triggers are heard
        self.db_up = asyncio.Event()
        self.drain_timeout = drain_timeout
        # What the process should exit with: 70 once the worker stopped by
        # itself (an async step it could not cancel), never 0 then.
        self.exit_code = 0
        self._drain_deadline: float | None = None

    def drain_by(self) -> float:
        """The drain's deadline, set at its first use after the stop."""
        if self._drain_deadline is None:
            self._drain_deadline = asyncio.get_running_loop().time() + self.drain_timeout()
        return self._drain_deadline

    def health(self, lease_valid: bool) -> str | None:
        """None while the worker serves triggers; otherwise why not, in a few words."""
        if self.stopping.is_set():
            return "draining"
        if not self.ready.is_set():
            return "starting"
        if not self.db_up.is_set():
            return "database down"
        if not lease_valid:
            # The listener may still hear, but no heartbeat got through in
            # time (a stalled pool, a database refusing writes).
            return "heartbeat not confirmed"
        return None
