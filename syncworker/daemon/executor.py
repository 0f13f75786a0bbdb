"""The executor: wake -> claim -> start the run's task -> orchestrator; and
the drain on stop.

It owns the wake-up (`wake()`: a run may be claimable) and the runs' tasks,
recorded in the slot ledger. A claim's token of the lease is taken before
the claim is sent: the lease must hold from then on (lease.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker import runtime
from syncworker.aio import Background, cancel_and_wait
from syncworker.daemon.catalog import Catalog, Snapshot
from syncworker.daemon.lifecycle import Lifecycle
from syncworker.daemon.slots import Slots
from syncworker.db import ClaimedRun, Store
from syncworker.dberrors import TRANSIENT, first_line
from syncworker.exits import EX_SOFTWARE
from syncworker.lease import Lease, Token
from syncworker.metrics import Metrics
from syncworker.orchestrator import RunEnv, execute_run

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class Executor:
    def __init__(
        self,
        *,
        worker_id: str,
        store: Store,
        catalog: Catalog,
        slots: Slots[RunEnv],
        lease: Lease,
        life: Lifecycle,
        connect: Connect,
        step_connect: Connect,
        background: Background,
        log: FilteringBoundLogger,
        metrics: Metrics,
        state_changed: Callable[[], None],
        request_stop: Callable[[], None],
        cancel_grace: Callable[[], float],
    ) -> None:
        self._worker_id = worker_id
        self._store = store
        self._catalog = catalog
        self._slots = slots
        self._lease = lease
        self._life = life
        self._connect = connect
        self._step_connect = step_connect
        self._background = background
        self._log = log
        self._metrics = metrics
        self._state_changed = state_changed
        self._request_stop = request_stop
        self._cancel_grace = cancel_grace
        self._woken = asyncio.Event()
        self._said_abandoned = False
        self._confirming: set[int] = set()  # runs whose cancel is being read

    def wake(self) -> None:
        """A run may be claimable, or a slot free: look."""
        self._woken.set()

    def drain_begins(self) -> None:
        """The worker stops: every run's ctx.stopping is set."""
        for env in self._slots.envs.values():
            env.stopping.set()

    def cancel_requested(self, run_id: int) -> None:
        """A wake said an operator cancelled run `run_id`: if it is ours, stop
        it once the database confirms the request (any role may send the wake)."""
        env = self._slots.envs.get(run_id)
        if env is None or env.cancel.why is not None or run_id in self._confirming:
            return  # not ours, cancelled already, or being confirmed: a flood costs one read
        self._confirming.add(run_id)
        task = self._background.spawn(self._confirm_cancel(run_id, env))
        task.add_done_callback(lambda _: self._confirming.discard(run_id))

    async def _confirm_cancel(self, run_id: int, env: RunEnv) -> None:
        try:
            async with self._connect() as conn:
                why = await self._store.cancel_request(conn, run_id)
        except TRANSIENT as exc:
            # Unconfirmed: the run goes on; a new cancel() call sends a new wake.
            self._log.warning("cancel_unconfirmed", run_id=run_id, error=first_line(exc))
            return
        if why is None or self._slots.envs.get(run_id) is not env or env.cancel.why is not None:
            return  # forged, or the run ended meanwhile
        env.cancel.why = why
        grace = self._cancel_grace()
        self._log.info("run_cancel_requested", run_id=run_id, reason=why, grace=grace)
        env.stopping.set()  # ctx.stopping, and SIGTERM for a command
        asyncio.get_running_loop().call_later(grace, self._cancel_after_grace, run_id, env)

    def _cancel_after_grace(self, run_id: int, env: RunEnv) -> None:
        if self._slots.envs.get(run_id) is env:
            self.cancel_run(run_id, "cancelled")

    async def run(self) -> None:
        self.wake()  # pending runs may be waiting from before we started
        while True:
            await self._woken.wait()
            self._woken.clear()
            await self._life.db_up.wait()
            while self._lease.valid() and self._slots.held_by_others() < self._slots.concurrency:
                # Shielded: a stop arriving between the claim's commit and the
                # run's start must not leave a claimed run that nobody runs.
                self._slots.claiming = asyncio.ensure_future(self._claim_one())
                self._slots.claims.follow(self._slots.claiming)
                if not await asyncio.shield(self._slots.claiming):
                    break

    async def _claim_one(self) -> bool:
        # The steps as they are now: a reload during the claim must not make
        # the run start other steps than the one the claim recorded.
        snapshot = self._catalog.now
        first = snapshot.first_steps
        # Taken before the claim is sent: the lease must hold from then on.
        token = self._lease.token()
        try:
            async with self._connect() as conn:
                run = await self._store.claim(conn, self._worker_id, snapshot.claimable, first)
        except TRANSIENT as exc:
            self._log.warning("claim_failed", error=first_line(exc))
            return False  # the listener's reconnect wakes us again
        if run is None:
            return False
        self.start_run(run, snapshot, "claim", token)
        return True

    def start_run(self, run: ClaimedRun, snapshot: Snapshot, via: str, token: Token) -> None:
        """Start a claimed run with the job and steps of `snapshot`, the one
        its claim saw (a reload meanwhile does not change them, nor remove
        the job from under it); `token` is the lease's, taken before the
        claim was sent."""
        # The run's own stop request (ctx.stopping): set for all at a drain,
        # and for this one by an operator's cancel.
        stopping = asyncio.Event()
        if self._life.stopping.is_set():
            stopping.set()
        env = RunEnv(
            store=self._store,
            connect=self._connect,
            step_connect=self._step_connect,
            log=self._log,
            stopping=stopping,
            via=via,
            token=token,
        )
        work = self._run_work(run)
        task = asyncio.create_task(
            execute_run(run, snapshot.jobs[run.job], snapshot.steps[run.job], env),
            name=f"run-{run.id}",
            context=runtime.context_for(work),
        )
        self._slots.runs[run.id] = task
        self._slots.envs[run.id] = env
        self._state_changed()
        loop = asyncio.get_running_loop()
        claimed = loop.time()
        self._metrics.run_started(run.job)

        def done(t: asyncio.Task[str]) -> None:
            self._slots.runs.pop(run.id, None)
            self._slots.envs.pop(run.id, None)
            if work.busy():
                self._slots.lingering[run.id] = work  # its slot is freed by on_idle
            else:
                self._slots.work.pop(run.id, None)
            self._state_changed()
            self.wake()  # a slot is free, and a follow-up of this key may wait
            self._metrics.run_finished(run.job, _outcome(t, env), loop.time() - claimed)
            if not t.cancelled() and t.exception() is not None:
                self._log.error("run_crashed", run_id=run.id, exc_info=t.exception())

        task.add_done_callback(done)

    def _run_work(self, run: ClaimedRun) -> runtime.RunWork:
        work = runtime.RunWork(run.id, run.job)

        def on_abandon(left: runtime.Leftover) -> None:
            if left.kind != "task":
                return
            # An async step that ignores its cancellation holds the loop's
            # time and its slot for as long as it likes: a restart is the
            # only way to be rid of it, so the worker drains and exits 70
            # for its supervisor to start it again.
            self._life.exit_code = EX_SOFTWARE
            if not self._life.stopping.is_set():
                self._log.error(
                    "worker_restart_needed",
                    reason="an async step did not end after its cancellation",
                    **left.describe(),
                )
                self._request_stop()

        def on_idle() -> None:
            if self._slots.lingering.pop(run.id, None) is not None:
                self._slots.work.pop(run.id, None)
                self._state_changed()
                self.wake()  # its slot is free now

        work.on_abandon = on_abandon
        work.on_idle = on_idle
        self._slots.work[run.id] = work
        return work

    def cancel_run(self, run_id: int, reason: str) -> None:
        """Cancel a run's task, and kill its steps' child processes at once:
        the run is not ours to execute any more."""
        task, work = self._slots.runs.get(run_id), self._slots.work.get(run_id)
        if work is not None:
            work.reason = reason
            work.kill()
        if task is not None:
            task.cancel()

    async def settle_claims(self) -> None:
        """Wait, until the drain's deadline, for every claim decided before
        the stop, so each run it made ours is in _runs for the drain. One
        still unanswered then is cancelled (the listener's with the listener):
        if it committed, the run is ours in the table with nothing running
        it, and peers take it back as soon as we are marked stopped."""
        if not len(self._slots.claims):
            return
        settled = asyncio.ensure_future(self._slots.claims.settled())
        await self._until_forced({settled}, self._life.drain_by())
        if not settled.done():
            settled.cancel()
            self._log.warning("claims_abandoned", claims=len(self._slots.claims))
            await self._background.cancel()

    async def drain(self) -> None:
        """Wait for in-flight runs up to drain_timeout (or a second signal), then
        cancel the rest; each cancelled run puts itself back to pending. Steps
        abandoned meanwhile are waited for until the same deadline."""
        deadline = self._life.drain_by()  # once: run() drains again on its way out
        tasks = set(self._slots.runs.values())
        if tasks:
            gathered: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
            await self._until_forced({gathered}, deadline)
            leftover = [t for t in tasks if not t.done()]
            if leftover:
                self._log.warning("drain_cancelling", runs=sorted(self._slots.runs))
                reason = "second signal" if self._life.force.is_set() else "drain timeout"
                for run_id in list(self._slots.runs):
                    if run_id in self._slots.work:
                        self._slots.work[run_id].reason = reason
                await cancel_and_wait(leftover)
            await gathered
        await self._drain_abandoned(deadline)

    async def _until_forced(self, futures: set[asyncio.Future[Any]], deadline: float) -> None:
        """Wait for all of `futures` until `deadline` or a second signal."""
        if not futures or self._life.force.is_set():
            return
        together: asyncio.Future[Any] = asyncio.gather(*futures, return_exceptions=True)
        force: asyncio.Future[Any] = asyncio.create_task(self._life.force.wait())
        try:
            await asyncio.wait(
                {together, force},
                timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            force.cancel()

    async def _drain_abandoned(self, deadline: float) -> None:
        """Give abandoned steps until the drain's deadline to end; then say
        which still run. The process exit ends their threads; a task of ours
        still running makes the exit non-zero (cli.py exits without waiting)."""
        left = self._slots.abandoned()
        await self._until_forced({a.ended for a in left}, deadline)
        left = self._slots.abandoned()
        if not left or self._said_abandoned:
            return
        self._said_abandoned = True
        self._log.warning("drain_abandoned", steps=[a.describe() for a in left])
        if self._slots.stuck_tasks():
            self._life.exit_code = EX_SOFTWARE


def _outcome(task: asyncio.Task[str], env: RunEnv) -> str:
    """A finished run's status for the metrics: what execute_run returned (the
    status it wrote), else why it has none."""
    if task.cancelled():
        return "lost" if env.lost.is_set() else "interrupted"
    if task.exception() is not None:
        return "crashed"
    return task.result()
