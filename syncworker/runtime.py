"""What one run's steps have under way beyond the step's own await.

A cancelled await does not stop everything a step started: a plain function
goes on in its thread, and an async step that swallows CancelledError goes on
as a task. Such leftovers are *abandoned*: the run's outcome is written at
once, but the run's slot stays taken until they really end, so a worker never
has more steps executing than `concurrency`. Child processes of
`isolation = "process"` steps are listed too, so that whoever must stop a
run's execution at once (a fence, a lost lease) can kill them: `kill()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# How long an async step gets to end after its cancellation before it is
# abandoned. SPEC's `cancel_grace` (default 10) is the operator-cancel twin.
CANCEL_GRACE = 10.0


@dataclass(eq=False)
class Leftover:
    """One abandoned piece of step work, still running."""

    run_id: int
    job: str
    step: str
    kind: str  # "thread" or "task"
    reason: str
    ended: asyncio.Future[None]

    def describe(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "job": self.job, "step": self.step, "runtime": self.kind}


@dataclass(eq=False)
class RunWork:
    """A run's leftovers and child processes. The worker makes one per run and
    runs the run's task in a context where `current()` returns it."""

    run_id: int
    job: str
    # Why the run would be cancelled now: the worker says so before it
    # cancels (fenced, drain timeout, ...); any other cancel is the timeout.
    reason: str = "timeout"
    leftovers: set[Leftover] = field(default_factory=set)
    children: set[int] = field(default_factory=set)  # process group ids
    # Called on each abandonment and when the last leftover ends.
    on_abandon: Callable[[Leftover], None] | None = None
    on_idle: Callable[[], None] | None = None

    def busy(self) -> bool:
        return bool(self.leftovers)

    def abandon(self, step: str, kind: str, ended: asyncio.Future[None]) -> Leftover:
        left = Leftover(self.run_id, self.job, step, kind, self.reason, ended)
        self.leftovers.add(left)
        ended.add_done_callback(lambda _: self._ended(left))
        if self.on_abandon is not None:
            self.on_abandon(left)
        return left

    def _ended(self, left: Leftover) -> None:
        self.leftovers.discard(left)
        if not self.leftovers and self.on_idle is not None:
            self.on_idle()

    async def wait_idle(self) -> None:
        while self.leftovers:
            await asyncio.wait({left.ended for left in self.leftovers})

    def kill(self) -> None:
        """SIGKILL every child process of the run's steps now. The hook for a
        worker that must stop executing a run it may no longer own; the step
        then fails or is cancelled as its run's task decides."""
        for pgid in list(self.children):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


_CURRENT: contextvars.ContextVar[RunWork | None] = contextvars.ContextVar(
    "syncworker_run_work", default=None
)


def current() -> RunWork | None:
    """The RunWork of the run whose task calls this, if the worker made one."""
    return _CURRENT.get()


def context_for(work: RunWork) -> contextvars.Context:
    """A context to run a run's task in (asyncio.create_task(context=...))."""
    ctx = contextvars.copy_context()
    ctx.run(_CURRENT.set, work)
    return ctx
