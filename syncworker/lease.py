"""The worker's lease on its runs: how long a heartbeat write proves that no
peer may take them over, and the means to stop a run's step once it lapses.

A heartbeat write sent at monotonic time `s` and answered before the lease
in force expired extends it to `s + self_fence_after`. Peers take a worker's
runs over only once its `heartbeat_at` (written by the database clock at the
write, so not before `s`) is older than `takeover_after` by the database
clock (db/sql/queries/liveness.sql, fragment worker_gone). `self_fence_after
< takeover_after`, and the difference is the margin for the clocks' rate
difference and for stopping the steps (README "Self-fencing" has the argument).

A lease answered late (after the one in force expired) starts a new epoch:
a peer may have taken the runs over in the gap, so a run whose token belongs
to an older epoch stays fenced for good, even once the worker beats again.

Each run gets a `Token`; its steps check it:

- async code: `guard(coro, token)` checks it at every resumption of the
  step's coroutine (so also the first one after a SIGCONT) and throws
  CancelledError into the step when lapsed;
- plain-thread code: `token.install_in_thread(stop)`, called inside the
  step's thread, sets a profile hook that raises `LeaseLapsed` at the
  thread's next call or return once lapsed, and `StepStopped` once its run
  gave the step up (a step that catches BaseException defeats it);
- processes (command steps, and any child a step runtime starts):
  `token.watch(pid)` hands the process group to a watchdog process that is
  not frozen with the worker and kills the group with SIGKILL when the
  lease lapses (`syncworker/fencewatch.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Generator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

# All the lease's numbers, as fractions of heartbeat_interval (h).
# Takeover plus a sweep stays near h, the SPEC's detection bound for a dead
# worker; the lease outlasts three missed writes; the margin is 0.2 h.
RENEW_FRACTION = 1 / 6  # a heartbeat write every h / 6
SELF_FENCE_FRACTION = 0.6  # the lease lasts 0.6 h from a write's send time
TAKEOVER_FRACTION = 0.8  # peers take over 0.8 h after the last heartbeat_at
RECOVER_FRACTION = 0.25  # peers look for runs to take over every h / 4
# A worker whose liveness session still holds its lock is judged gone only
# after this many intervals of silence (as before the lease).
STALE_HEARTBEATS = 3


@dataclass(frozen=True)
class LeaseTiming:
    """Every timing of the lease and of takeover, from heartbeat_interval."""

    heartbeat_interval: float

    @property
    def renew_every(self) -> float:
        return self.heartbeat_interval * RENEW_FRACTION

    @property
    def self_fence_after(self) -> float:
        return self.heartbeat_interval * SELF_FENCE_FRACTION

    @property
    def takeover_after(self) -> float:
        """How stale a peer's heartbeat_at must be before its runs are taken:
        the floor for every takeover rule but an explicit stop."""
        return self.heartbeat_interval * TAKEOVER_FRACTION

    @property
    def stale_after(self) -> float:
        """How stale a peer's heartbeat_at must be while it holds its lock."""
        return self.heartbeat_interval * STALE_HEARTBEATS

    @property
    def recover_every(self) -> float:
        return self.heartbeat_interval * RECOVER_FRACTION

    @property
    def margin(self) -> float:
        return self.takeover_after - self.self_fence_after


class StepStopped(BaseException):
    """Raised into a plain-thread step its run gave up (a timeout, a drain,
    a second signal). A BaseException, so that a step's `except Exception`
    does not swallow it."""


class LeaseLapsed(StepStopped):
    """Raised into a plain-thread step once its run's lease lapsed."""


class Stop:
    """The worker's request that one step stop: set when its run gives it up
    and goes on without it (steps.py abandons it), read by the step's thread
    hook and async guard, which raise into it from then on."""

    __slots__ = ("asked",)

    def __init__(self) -> None:
        self.asked = False


class Lease:
    """One worker's lease. Renewed and checked on the event loop's thread;
    tokens are checked from any thread."""

    def __init__(self, timing: LeaseTiming) -> None:
        self.timing = timing
        # (epoch, monotonic expiry), replaced as one object so that a step
        # thread never reads an epoch with another epoch's expiry.
        self._state: tuple[int, float] = (0, -math.inf)
        self._on_lapse: Callable[[], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reported = 0  # the last epoch whose lapse was reported
        self._watchdog: _Watchdog | None = None

    def start(self, on_lapse: Callable[[], None]) -> None:
        """Call `on_lapse` on the running loop each time the lease lapses."""
        self._on_lapse = on_lapse

    def renew(self, sent: float, answered: float) -> None:
        """A heartbeat write sent at `sent` was answered at `answered`
        (both time.monotonic())."""
        epoch, expires = self._state
        if answered >= expires:
            # Lapsed before the answer: the runs of that epoch stay fenced.
            epoch, expires = epoch + 1, sent + self.timing.self_fence_after
        else:
            expires = max(expires, sent + self.timing.self_fence_after)
        self._state = (epoch, expires)
        if self._watchdog is not None:
            self._watchdog.lease(epoch, expires)
        self._arm(expires)

    def valid(self) -> bool:
        return time.monotonic() < self._state[1]

    def token(self) -> Token:
        """A token for a run claimed now: valid while this epoch lasts."""
        return Token(self, self._state[0])

    def remaining(self) -> float:
        return self._state[1] - time.monotonic()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None

    def _arm(self, expires: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with contextlib.suppress(RuntimeError):  # no loop: nobody to tell
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, expires - time.monotonic()), self._check)

    def _check(self) -> None:
        epoch, expires = self._state
        remaining = expires - time.monotonic()
        if remaining > 0:  # a timer may fire a hair early
            self._arm(expires)
            return
        if self._reported < epoch and self._on_lapse is not None:
            self._reported = epoch
            self._on_lapse()

    def _watch(self, epoch: int, pid: int, group: bool) -> Watch:
        if self._watchdog is None or not self._watchdog.alive():
            self._watchdog = _Watchdog()
            self._watchdog.lease(*self._state)
        return self._watchdog.watch(epoch, pid, group)


class Token:
    """A run's right to execute: its epoch of the lease, while unexpired."""

    __slots__ = ("_epoch", "_lease")

    def __init__(self, lease: Lease, epoch: int) -> None:
        self._lease = lease
        self._epoch = epoch

    def valid(self) -> bool:
        epoch, expires = self._lease._state
        return epoch == self._epoch and time.monotonic() < expires

    def install_in_thread(self, stop: Stop | None = None) -> None:
        """Make the calling thread raise LeaseLapsed at its next Python call,
        return or C call once this token is no longer valid, and StepStopped
        once `stop` is asked.

        It runs at every such event, so it is kept to a read of the lease's
        state, of the clock and of `stop` (measured in tests/daemon/test_self_fence.py)."""
        lease, epoch, stop = self._lease, self._epoch, stop or Stop()

        def hook(
            frame: FrameType, event: str, arg: Any, _now: Callable[[], float] = time.monotonic
        ) -> None:
            state = lease._state
            if state[0] != epoch or _now() >= state[1]:
                raise LeaseLapsed("the worker could not confirm its ownership of the run")
            if stop.asked:
                raise StepStopped("the run gave this step up")

        sys.setprofile(hook)

    def watch(self, pid: int, *, group: bool = True) -> Watch:
        """Have the watchdog SIGKILL the process group `pid` (or the process
        alone with group=False) when this token stops being valid; release
        the returned Watch once the process (group) is gone.

        For any child process a step runtime starts: the watchdog is its own
        process, so it acts while the worker is frozen (SIGSTOP) or its
        loop blocked."""
        return self._lease._watch(self._epoch, pid, group)


class Watch:
    def __init__(self, watchdog: _Watchdog | None, key: int) -> None:
        self._watchdog = watchdog
        self._key = key

    def release(self) -> None:
        if self._watchdog is not None:
            self._watchdog.unwatch(self._key)
            self._watchdog = None


class _Watchdog:
    """The worker's end of `python -m syncworker.fencewatch`."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            # By path and isolated: it needs no import of the package.
            [sys.executable, "-I", str(Path(__file__).with_name("fencewatch.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            # Its own session: a signal to the worker's group (Ctrl-C, a
            # group SIGSTOP) leaves it be. It ends when the pipe closes.
            start_new_session=True,
            close_fds=True,
        )
        assert self._proc.stdin is not None
        self._fd = self._proc.stdin.fileno()
        self._next_key = 0

    def alive(self) -> bool:
        return self._proc.poll() is None

    def lease(self, epoch: int, expires: float) -> None:
        self._send(f"lease {epoch} {expires!r}")

    def watch(self, epoch: int, pid: int, group: bool) -> Watch:
        self._next_key += 1
        self._send(f"watch {self._next_key} {epoch} {pid} {int(group)}")
        return Watch(self, self._next_key)

    def unwatch(self, key: int) -> None:
        self._send(f"unwatch {key}")

    def close(self) -> None:
        assert self._proc.stdin is not None
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _send(self, line: str) -> None:
        # A short line to a pipe the watchdog drains: one write, never blocking
        # for long. A dead watchdog is replaced at the next watch().
        with contextlib.suppress(OSError):
            os.write(self._fd, (line + "\n").encode())


# The running run's token: set by execute_run in the run's task, read by the
# step runtimes (steps.py) for threads and processes they start.
current: ContextVar[Token | None] = ContextVar("syncworker_lease_token", default=None)


def guard(coro: Awaitable[T], token: Token | None, stop: Stop | None = None) -> Awaitable[T]:
    """`coro`, but every resumption first checks `token` and `stop`: once the
    token is not valid or a stop is asked, CancelledError is thrown into the
    step instead, again at each resumption for as long as the step goes on."""
    if token is None:
        return coro
    return _guarded(_Guarded(coro.__await__(), token, stop or Stop()))


async def _guarded(awaitable: _Guarded[T]) -> T:
    return await awaitable


class _Guarded(Generator[Any, Any, T]):
    def __init__(self, coro: Generator[Any, Any, T], token: Token, stop: Stop) -> None:
        self._coro = coro
        self._token = token
        self._stop = stop
        self._fenced = False

    def __await__(self) -> Generator[Any, Any, T]:
        return self

    def send(self, value: Any) -> Any:
        if self._stop.asked or not self._token.valid():
            return self._fence()
        return self._coro.send(value)

    def throw(
        self,
        typ: type[BaseException] | BaseException,
        val: BaseException | object = None,
        tb: TracebackType | None = None,
    ) -> Any:
        if self._stop.asked or not self._token.valid():
            return self._fence()
        if isinstance(typ, BaseException):
            return self._coro.throw(typ)
        exc = val if isinstance(val, BaseException) else typ()
        return self._coro.throw(exc.with_traceback(tb) if tb is not None else exc)

    def close(self) -> None:
        self._coro.close()

    def _fence(self) -> Any:
        self._fenced = True
        why = "given up" if self._stop.asked else "lease lapsed"
        try:
            return self._coro.throw(asyncio.CancelledError(why))
        except StopIteration:
            # It swallowed the cancellation and returned: what it did after
            # the lapse is not an outcome of the run.
            raise asyncio.CancelledError(why) from None
