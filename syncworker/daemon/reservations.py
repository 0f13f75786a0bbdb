"""Runs trigger() reserved for this worker (sql/005): a wake names one, and
the worker claims it before anything of it runs.

Nothing in the notification is trusted: any role may NOTIFY any channel,
and may replay an old wake. The notification only says which run to try;
the claim (`UPDATE ... WHERE id = .. AND reserved_for = me AND status =
'pending'`) decides whether it is ours, and the run starts from the row the
claim returns (job, scope, payload, attempt), never from the message. A
forged or stale wake finds no such row and starts nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker.aio import Background
from syncworker.daemon.catalog import Catalog, Snapshot
from syncworker.daemon.connsettings import LISTENER_LOCK_TIMEOUT
from syncworker.daemon.slots import Slots
from syncworker.db import ClaimedRun, Store
from syncworker.dberrors import TRANSIENT, first_line
from syncworker.events import reserved_run_id
from syncworker.lease import Lease, Token

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class Reservations:
    def __init__(
        self,
        *,
        worker_id: str,
        store: Store,
        catalog: Catalog,
        slots: Slots[Any],
        lease: Lease,
        stopping: asyncio.Event,
        connect: Connect,
        background: Background,
        log: FilteringBoundLogger,
        free_slot: Callable[[], bool],
        start_run: Callable[[ClaimedRun, Snapshot, str, Token], None],
        wake: Callable[[], None],
    ) -> None:
        self._worker_id = worker_id
        self._store = store
        self._catalog = catalog
        self._slots = slots
        self._lease = lease
        self._stopping = stopping
        self._connect = connect
        self._background = background
        self._log = log
        self._free_slot = free_slot
        self._start_run = start_run
        self._wake = wake
        # One release of untaken reservations at a time (release_untaken).
        self._releasing: asyncio.Future[None] | None = None
        self._release_again = False

    async def on_reservation(
        self, payload: str, session: psycopg.AsyncConnection[Any] | None
    ) -> None:
        """A wake naming a run reserved for us: try to claim it. The message
        is only a hint (any role may send one): the claim decides.

        On the session that heard it when it came alone (as _enqueue does):
        no task to spawn and no pooled connection to check out before the
        step. The claim then waits for the run's row at most
        LISTENER_LOCK_TIMEOUT, and past that is made again on a pooled one.
        """
        run_id = reserved_run_id(payload, self._worker_id)
        if run_id is None:
            return
        claiming = self._slots.claim_in_flight()
        if (
            session is None
            or run_id in self._slots.runs
            or run_id in self._slots.deciding
            or claiming
            or not self._free_slot()
        ):
            self.on_reserved(run_id)
            return
        self._slots.deciding.add(run_id)
        token = self._lease.token()
        with self._slots.claims.track():
            try:
                await self._claim_reserved(run_id, token, session)
            except psycopg.errors.LockNotAvailable:
                self._slots.deciding.add(run_id)  # still deciding: on a pooled session now
                self._slots.claims.follow(
                    self._background.spawn(self._claim_reserved(run_id, token))
                )

    def on_reserved(self, run_id: int) -> None:
        # Heard twice (the notification, and the look after a reconnect), or
        # replayed: claimed once at most.
        if run_id in self._slots.runs or run_id in self._slots.deciding:
            return
        claiming = self._slots.claiming
        if claiming is not None and not claiming.done():
            # Our claim in flight may take the last slot: decide after it.
            self._background.spawn(self._take_after_claim(run_id, claiming))
        else:
            self._take_reservation(run_id)

    async def _take_after_claim(self, run_id: int, claiming: asyncio.Future[bool]) -> None:
        self._slots.deciding.add(run_id)
        try:
            await asyncio.wait({claiming})
        finally:
            self._slots.deciding.discard(run_id)
        if run_id not in self._slots.runs:
            self._take_reservation(run_id)

    def _take_reservation(self, run_id: int) -> None:
        if not self._free_slot():
            reason = "draining" if self._stopping.is_set() else "no free slot"
            self._log.debug("reservation_released", run_id=run_id, reason=reason)
            self.release_untaken()
            return
        # The slot is held from now: counted in _deciding until the claim
        # answers, then in _runs if it made the run ours. The lease's token
        # is taken before the claim is sent: it must hold from then on.
        self._slots.deciding.add(run_id)
        self._slots.claims.follow(
            self._background.spawn(self._claim_reserved(run_id, self._lease.token()))
        )

    async def _claim_reserved(
        self, run_id: int, token: Token, session: psycopg.AsyncConnection[Any] | None = None
    ) -> None:
        """Claim; with `session` (the listener's), within its lock budget."""
        # The steps as they are now, as in the executor's claim.
        snapshot = self._catalog.now
        first = snapshot.first_steps
        connect: Connect = self._connect if session is None else (lambda: nullcontext(session))
        try:
            run = await claim(
                self._store,
                connect,
                self._log,
                self._worker_id,
                run_id,
                snapshot.claimable,
                first,
                lock_timeout=None if session is None else LISTENER_LOCK_TIMEOUT,
            )
        finally:
            self._slots.deciding.discard(run_id)
        if run is None:
            self._log.debug("reservation_not_claimed", run_id=run_id)
            self._wake()  # the slot it held is free again
            return
        self._start_run(run, snapshot, "reservation", token)

    def release_untaken(self) -> None:
        """Give back every reservation we are not taking, in one statement at
        a time however many wakes asked: a flood of forged wakes while every
        slot is busy must not queue a pooled statement each, ahead of the
        heartbeat (its lease would lapse)."""
        if self._releasing is not None and not self._releasing.done():
            self._release_again = True
            return
        self._release_again = False
        self._releasing = asyncio.ensure_future(self._release_all_untaken())

    async def _release_all_untaken(self) -> None:
        while True:
            try:
                async with self._connect() as conn:
                    await self._store.release_reserved(
                        conn, self._worker_id, keep=[*self._slots.runs, *self._slots.deciding]
                    )
            except TRANSIENT as exc:
                self._log.warning("release_failed", error=first_line(exc))
            if not self._release_again:
                return
            self._release_again = False

    async def offer(self, conn: psycopg.AsyncConnection[Any]) -> None:
        snapshot = self._catalog.now
        enabled = {
            job: step for job, step in snapshot.first_steps.items() if job in snapshot.claimable
        }
        # We claim a reservation from its row and read nothing else off its
        # wake (reserved.py), so trigger() may reserve for us (sql/007).
        await self._store.offer(
            conn, self._worker_id, self._slots.concurrency, enabled, reserve_by_id=True
        )


async def claim(
    store: Store,
    connect: Connect,
    log: FilteringBoundLogger,
    worker_id: str,
    run_id: int,
    jobs: Sequence[str],
    first_steps: Mapping[str, str],
    lock_timeout: str | None = None,
) -> ClaimedRun | None:
    """Claim the run reserved for `worker_id`, as the row the claim returns;
    None when it is not ours to start (not reserved for us, not pending, a
    job not run here, its key running elsewhere) or the claim failed.

    Triggers that joined the run while it was pending all happened before
    this claim, so before its step: the run serves them, and no follow-up is
    needed (the step starts only once the claim returns).

    With `lock_timeout`, a claim that would wait longer for the run's row
    raises LockNotAvailable (the caller claims again where it may wait).
    """
    try:
        async with connect() as conn:
            return await store.claim_reserved(
                conn, worker_id, run_id, jobs, first_steps, lock_timeout
            )
    except psycopg.errors.LockNotAvailable:
        if lock_timeout is not None:
            raise  # the caller's to claim again, waiting
        log.warning("claim_failed", run_id=run_id, error="the run's row stayed locked")
        return None
    except psycopg.Error as exc:
        # Still reserved for us if the claim did not go through: taken on
        # our next reconnect, or released by recovery if we are judged gone.
        log.warning("claim_failed", run_id=run_id, error=str(exc).strip()[:200])
        return None
