"""Run one claimed run: its steps in order, retries with backoff, a timeout
per attempt, counters, and a recorded outcome.

Outcomes are written through fenced store calls: if this worker lost the run
(orphan recovery gave it to another), nothing it writes afterwards counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker import lease, runtime
from syncworker.aio import cancel_and_wait, wait_event
from syncworker.config import JobConfig
from syncworker.context import StopRequest, SyncContext
from syncworker.counters import Counters
from syncworker.db import ClaimedRun, Store
from syncworker.dberrors import TRANSIENT
from syncworker.steps import Step, StepFailed

T = TypeVar("T")
Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]

# How long the final writes of a run keep retrying through a database outage
# before giving up; orphan recovery settles whatever is left.
_PERSIST_FOR = 60.0
_ERROR_LIMIT = 4000
# The most often a running step's counters reach the runs row and its
# run_progress event: followers get a live view, the database and the events
# channel a bounded load however fast a step counts.
PROGRESS_INTERVAL = 1.0


class _Interrupted(Exception):
    """The worker is draining: stop at this step boundary and requeue."""


@dataclass
class CancelRequest:
    """An operator's cancel of the run (cancel(), confirmed from the
    database's cancels by the worker): once `why` is set, every outcome the
    run writes is `cancelled` with `why` as its error, and it is not retried."""

    why: str | None = None


@dataclass(frozen=True)
class RunEnv:
    store: Store
    connect: Connect  # the worker's own connections, for its writes
    step_connect: Connect  # the steps' pool (steppool.py), for ctx.connection()
    log: FilteringBoundLogger
    stopping: asyncio.Event
    # Set by the worker, before it cancels the run, when the database shows
    # the run is no longer this worker's: nothing may be written for it.
    lost: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # Set once the run starts writing its outcome (fenced itself): from then
    # on the run may leave `running` by its own hand, so the worker's fence
    # check must leave it alone.
    settling: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # How the run became ours, for its run_started line: "claim" (the queue),
    # "reservation" (trigger() reserved it for this worker, which claimed it)
    # or "trigger" (the NOTIFY this worker enqueued, claimed by the same
    # call). Every run starts from its claimed row, whatever the way.
    via: str = "claim"
    # The worker's lease for this run (lease.py): its steps stop once it is
    # no longer valid, before a peer may take the run over.
    token: lease.Token | None = None
    cancel: CancelRequest = dataclasses.field(default_factory=CancelRequest)

    def self_fenced(self) -> bool:
        return self.token is not None and not self.token.valid()


async def execute_run(run: ClaimedRun, job: JobConfig, steps: Sequence[Step], env: RunEnv) -> str:
    """Run to an outcome; returns the run's final status as written.

    Cancellation (drain timeout, second signal) requeues the run and re-raises.
    """
    log = env.log.bind(run_id=run.id, job=run.job, scope=run.scope)
    # In this run's task only: the step runtimes hand it to threads and
    # processes they start.
    lease.current.set(env.token)
    log.info(
        "run_started",
        attempt=run.attempt,
        source=run.source,
        triggered_by=run.triggered_by,
        via=env.via,
    )
    loop = asyncio.get_running_loop()
    while True:
        counters = Counters()
        started = loop.time()
        try:
            await _attempt(run, job, steps, env, log, counters)
        except _Interrupted:
            return await _requeue(run, env, log, "interrupted by shutdown", counters)
        except asyncio.CancelledError:
            if env.self_fenced():  # stopped on our own, taken over or not
                await _self_fence(run, env, log)
            elif env.lost.is_set():
                log.warning("run_lost", reason="another worker took the run over")
            else:
                await _requeue(run, env, log, "cancelled by shutdown", counters)
            raise
        except Exception as exc:
            if env.self_fenced():  # a command the lease watchdog killed, say
                return await _self_fence(run, env, log)
            error = _describe(exc, job)
            log.warning(
                "attempt_failed",
                attempt=run.attempt,
                error=error,
                exc_info=not isinstance(exc, StepFailed | TimeoutError),
            )
        else:
            await _finish(run, env, log, "succeeded", counters, None, loop.time() - started)
            return "succeeded"

        if run.attempt >= run.max_attempts or env.stopping.is_set():
            if env.stopping.is_set() and run.attempt < run.max_attempts:
                return await _requeue(
                    run, env, log, f"interrupted by shutdown after: {error}", counters
                )
            await _finish(run, env, log, "failed", counters, error, loop.time() - started)
            return "failed"

        delay = job.retry_backoff * 2 ** (run.attempt - 1)
        log.info("run_retrying", attempt=run.attempt, next_attempt=run.attempt + 1, delay=delay)
        if await wait_event(env.stopping, delay) or await _abandoned_or_stop(env, log):
            return await _requeue(
                run, env, log, f"interrupted by shutdown after: {error}", counters
            )
        if env.self_fenced():  # no next attempt on a lapsed lease
            return await _self_fence(run, env, log)
        held = functools.partial(env.store.key_held, job=run.job, scope=run.scope)
        if await _persist(log, held, env):
            # Paused meanwhile (the vendor is down): the next attempt waits,
            # pending, for the resume instead of hitting it again.
            return await _requeue(run, env, log, f"held by a pause after: {error}", counters)
        if not await _persist(log, functools.partial(env.store.next_attempt, run=run), env):
            log.warning("run_lost", reason="another worker took the run over")
            return "lost"
        run = dataclasses.replace(run, attempt=run.attempt + 1, first_step_id=None)


async def _abandoned_or_stop(env: RunEnv, log: FilteringBoundLogger) -> bool:
    """Before a retry, wait for the last attempt's abandoned steps (a plain
    function still in its thread) to end: the next attempt must not execute
    alongside them. True if a drain began meanwhile."""
    work = runtime.current()
    if work is None or not work.busy():
        return False
    log.info("retry_waiting", reason="an abandoned step of the last attempt still runs")
    idle = asyncio.ensure_future(work.wait_idle())
    stop = asyncio.ensure_future(env.stopping.wait())
    try:
        await asyncio.wait({idle, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait([idle, stop])
    return env.stopping.is_set()


async def _self_fence(run: ClaimedRun, env: RunEnv, log: FilteringBoundLogger) -> str:
    """The lease lapsed under the run's step, which was stopped for it."""
    log.warning(
        "run_self_fenced",
        attempt=run.attempt,
        reason="ownership not confirmed in time: the step was stopped",
    )
    # Fenced like every write: a no-op if a peer has the run already.
    return await _requeue(run, env, log, "self-fenced: ownership not confirmed")


async def _attempt(
    run: ClaimedRun,
    job: JobConfig,
    steps: Sequence[Step],
    env: RunEnv,
    log: FilteringBoundLogger,
    counters: Counters,
) -> None:
    async with asyncio.timeout(job.timeout):
        for position, step in enumerate(steps):
            ctx = SyncContext(
                run_id=run.id,
                job=run.job,
                scope=run.scope,
                source=run.source,
                triggered_by=run.triggered_by,
                payload=run.payload,
                attempt=run.attempt,
                log=log.bind(step=step.name),
                stopping=StopRequest(env.stopping),
                _connect=env.step_connect,
                _run_counters=counters,
                scheduled_for=run.scheduled_for,
            )
            if position == 0 and run.first_step_id is not None:
                step_id = run.first_step_id  # the claim wrote this step's start
            else:
                async with env.connect() as conn:
                    step_id = await env.store.step_started(conn, run, position, step.name, counters)
            log.debug("step_started", step=step.name, position=position)
            step_over = asyncio.Event()
            flusher = asyncio.create_task(
                _flush_progress(run, env, log, ctx, step.name, step_over),
                name=f"progress-{run.id}",
            )
            status, error = "succeeded", None
            try:
                await lease.guard(step.run(ctx), env.token)
            except asyncio.CancelledError:
                status, error = "cancelled", "cancelled"
                raise
            except Exception as exc:
                if ctx.stopping.observed:
                    # It failed because it was asked to stop (a command step
                    # gets SIGTERM on drain): redo the run, do not fail it.
                    status, error = "cancelled", "stopped by shutdown"
                    raise _Interrupted from exc
                status, error = "failed", _describe(exc, job)
                raise
            finally:
                await _stop_flushing(flusher, step_over)
                _, step_counters = ctx.snapshot()
                write = functools.partial(
                    env.store.step_finished,
                    step_id=step_id,
                    status=status,
                    counters=step_counters,
                    error=error,
                )
                await _persist(log, write, env)
            log.info("step_finished", step=step.name, position=position, **_show(step_counters))
            # A drain lets the run go on through its steps, unless this step
            # saw the request and returned early: then the run is redone.
            if ctx.stopping.observed:
                raise _Interrupted


async def _flush_progress(
    run: ClaimedRun,
    env: RunEnv,
    log: FilteringBoundLogger,
    ctx: SyncContext,
    step: str,
    done: asyncio.Event,
) -> None:
    """While a step runs, publish its run's counters when they changed, at
    most every PROGRESS_INTERVAL, until `done` is set.

    Progress is best effort: a failed write is logged and tried again at the
    next tick, and never fails the run. The first flush, a second into the
    step, publishes even unchanged counters, since the step-start write that
    named the step was silent.
    """
    last: dict[str, Any] | None = None
    failing = False
    while not await wait_event(done, PROGRESS_INTERVAL):
        counters, _ = ctx.snapshot()
        state = counters.as_params()
        if state == last:
            continue
        try:
            async with env.connect() as conn:
                owned = await env.store.progress(conn, run, counters, step, publish=True)
        except Exception as exc:
            # Said once per outage: the run's own writes report the rest.
            (log.debug if failing else log.warning)("progress_write_failed", error=str(exc))
            failing = True
            continue
        if not owned:
            return  # fenced: the run is another worker's now
        last, failing = state, False


async def _stop_flushing(flusher: asyncio.Task[None], done: asyncio.Event) -> None:
    done.set()
    # A write in flight takes milliseconds: let it land rather than cancel it
    # mid-statement, which costs psycopg a cancel request to the server. It
    # must be over before the step's end is written, or a late flush could
    # put back the name of a step that has ended over the next one's.
    await asyncio.wait({flusher}, timeout=PROGRESS_INTERVAL)
    await cancel_and_wait([flusher])


async def _finish(
    run: ClaimedRun,
    env: RunEnv,
    log: FilteringBoundLogger,
    status: str,
    counters: Counters,
    error: str | None,
    seconds: float,
) -> None:
    env.settling.set()
    if env.cancel.why is not None:  # whatever the step did since, it was cancelled
        status, error = "cancelled", env.cancel.why
    owned = await _persist(log, lambda c: env.store.finish(c, run, status, counters, error), env)
    if not owned:
        log.warning("run_lost", reason="another worker took the run over", outcome=status)
        return
    fields: dict[str, Any] = {"duration_ms": round(seconds * 1000), **_show(counters)}
    if error is not None:
        fields["error"] = error
    (log.info if status in ("succeeded", "cancelled") else log.error)(
        f"run_{status}", attempt=run.attempt, **fields
    )


async def _requeue(
    run: ClaimedRun,
    env: RunEnv,
    log: FilteringBoundLogger,
    reason: str,
    counters: Counters | None = None,
) -> str:
    """Put the run back to pending (its attempt interrupted), or, once an
    operator cancelled it, end it `cancelled` with the attempt's `counters`."""

    # Shielded and bounded: a second signal must not leave the run `running`,
    # and a dead database must not hold the exit (orphan recovery covers it).
    async def write() -> str | None:
        why = env.cancel.why
        if why is not None:  # an operator's cancel: ended, never retried
            owned = await _persist(
                log,
                lambda c: env.store.finish(c, run, "cancelled", counters or Counters(), why),
                env,
                limit=10.0,
            )
            return "cancelled" if owned else None
        return await _persist(log, lambda c: env.store.requeue(c, run, reason), env, limit=10.0)

    env.settling.set()

    task = asyncio.ensure_future(write())
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True  # a repeated cancel must not abandon the write either
    status = task.result() or "lost"
    log.info("run_cancelled", reason=env.cancel.why or reason, status=status)
    if cancelled:
        raise asyncio.CancelledError
    return status


async def _persist(
    log: FilteringBoundLogger,
    op: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
    env: RunEnv,
    limit: float = _PERSIST_FOR,
) -> T | None:
    """Run one store write, retrying through a lost connection for a while."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    delay = 0.1
    while True:
        try:
            async with env.connect() as conn:
                return await op(conn)
        except TRANSIENT as exc:
            # An outage, or a read-only server during a fail-over.
            if loop.time() + delay > deadline:
                log.error("run_write_failed", error=str(exc))
                return None
            await asyncio.sleep(delay)  # backoff between reconnect attempts
            delay = min(delay * 2, 5.0)


def _describe(exc: BaseException, job: JobConfig) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        text = f"timed out after {job.timeout:g} s"
    elif isinstance(exc, StepFailed):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:_ERROR_LIMIT]


def _show(counters: Counters) -> dict[str, int]:
    return {k: v for k, v in counters.as_params().items() if v}
