"""Intake: a NOTIFY on the trigger channel -> validated requests -> runs.

Each notification is parsed against the catalog (triggers.py), enqueued
through trigger() on the session that heard it when it came alone
(listener.py says why), and, when it is a lone request with a slot free,
claimed for this worker by the same statement (trigger_and_claim) and
started on its answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker.aio import Background
from syncworker.daemon.catalog import Catalog, Snapshot
from syncworker.daemon.connsettings import LISTENER_LOCK_TIMEOUT
from syncworker.daemon.slots import Slots
from syncworker.db import ClaimedRun, Store
from syncworker.dberrors import first_line
from syncworker.lease import Lease, Token
from syncworker.metrics import Metrics
from syncworker.triggers import Rejected, TriggerRequest, parse_notification

# Deferred enqueues that may wait on locks at once, each holding a pooled
# connection; the pool has 2 per slot and 2 more.
DEFERRED_ENQUEUES = 2

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class Intake:
    def __init__(
        self,
        *,
        worker_id: str,
        store: Store,
        catalog: Catalog,
        slots: Slots[Any],
        lease: Lease,
        connect: Connect,
        background: Background,
        log: FilteringBoundLogger,
        metrics: Metrics,
        free_slot: Callable[[], bool],
        start_run: Callable[[ClaimedRun, Snapshot, str, Token], None],
        wake: Callable[[], None],
    ) -> None:
        self._worker_id = worker_id
        self._store = store
        self._catalog = catalog
        self._slots = slots
        self._lease = lease
        self._connect = connect
        self._background = background
        self._log = log
        self._metrics = metrics
        self._free_slot = free_slot
        self._start_run = start_run
        self._wake = wake
        # Deferred enqueues waiting for a key's lock (see _enqueue): a few
        # at a time, so NOTIFYs of locked keys cannot take the whole pool.
        self._deferred = asyncio.Semaphore(DEFERRED_ENQUEUES)

    async def on_trigger(
        self, session: psycopg.AsyncConnection[Any] | None, notify: psycopg.Notify
    ) -> None:
        """One notification on the trigger channel, to exactly one outcome:
        trigger_enqueued, trigger_rejected or trigger_failed."""
        self._metrics.count_trigger("received")
        said = False  # trigger_received, which every notification gets first
        try:
            parsed = parse_notification(notify.payload, self._catalog.now.job_info)
            if isinstance(parsed, Rejected):
                said = self._log_received(notify)
                self._metrics.count_trigger("rejected")
                self._log.warning(
                    "trigger_rejected", reason=parsed.reason, payload=notify.payload[:200]
                )
                return
            # The call goes out first, and the line is written while the
            # database works on it: a log line is a tenth of the time from
            # the NOTIFY to the step.
            enqueue = asyncio.ensure_future(self._enqueue(session, parsed))
            try:
                await asyncio.sleep(0)  # one turn: the task sends the call
                said = self._log_received(notify)
            finally:
                await enqueue  # cancelled meanwhile or not: it is under way
        except Exception as exc:
            # Guarantee 7: no payload may stop the daemon, not even one that
            # trips a bug; this runs on the listener, whose end would be ours.
            if not said:
                self._log_received(notify)
            self._metrics.count_trigger("failed")
            self._log.error("trigger_failed", error=repr(exc)[:500], exc_info=True)

    def _log_received(self, notify: psycopg.Notify) -> bool:
        self._log.info("trigger_received", payload=notify.payload[:200], sender_pid=notify.pid)
        return True

    async def _enqueue(
        self,
        session: psycopg.AsyncConnection[Any] | None,
        requests: Sequence[TriggerRequest],
        lock_timeout: str | None = LISTENER_LOCK_TIMEOUT,
        claim: bool = True,
    ) -> None:
        """Enqueue on the session that heard the NOTIFY when it is offered
        (listener.py says why), else on a pooled one.

        The listener waits for this call before it reads the next
        notification, so the call may wait for a lock only `lock_timeout`:
        an app transaction holding the key (a trigger() of it left open)
        would hold up every notification behind it. A request that finds
        its key locked is enqueued again in the background, where it waits
        as long as the lock is held, holding no slot (`claim` False: a
        plain trigger(), whose wake-up gets the run claimed)."""
        # All of a notification's requests or none; a lone trigger() call is
        # atomic by itself, and BEGIN and COMMIT would cost two round trips.
        atomic = len(requests) > 1
        try:
            async with (
                nullcontext(session) if session is not None else self._connect() as conn,
                conn.transaction() if atomic else nullcontext(),
            ):
                if not atomic and requests[0].run_after is None:
                    runs = await self._enqueue_and_claim(conn, requests[0], lock_timeout, claim)
                else:
                    runs = await self._enqueue_all(conn, requests, lock_timeout)
        except psycopg.errors.LockNotAvailable:
            # Nothing was written (the statement, or the transaction, failed).
            self._log.info("trigger_deferred", reason="its key is locked by an open transaction")
            self._background.spawn(self._enqueue_deferred(requests))
            return
        except psycopg.errors.InvalidParameterValue as exc:
            # trigger() refused it (the database's view of the jobs differs).
            reason = exc.diag.message_primary or str(exc)
            self._metrics.count_trigger("rejected")
            self._log.warning("trigger_rejected", reason=reason.removeprefix("syncworker: "))
            return
        except psycopg.Error as exc:
            self._metrics.count_trigger("failed")
            self._log.error("trigger_failed", error=first_line(exc))
            return
        # One outcome per notification: this, trigger_rejected or trigger_failed.
        # No wake-up of our own: trigger()'s notification wakes every worker,
        # and may reserve the run for one, which a claim of ours would only
        # delay (claims pass reserved runs over).
        self._log.info("trigger_enqueued", runs=runs)

    async def _enqueue_deferred(self, requests: Sequence[TriggerRequest]) -> None:
        async with self._deferred:
            await self._enqueue(None, requests, lock_timeout=None, claim=False)

    async def _enqueue_all(
        self,
        conn: psycopg.AsyncConnection[Any],
        requests: Sequence[TriggerRequest],
        lock_timeout: str | None,
    ) -> list[dict[str, Any]]:
        """Plain trigger() calls: several requests, or one with a delay of its
        own, whose run may not be claimed at once."""
        runs: list[dict[str, Any]] = []
        for req in requests:
            ids = await self._store.trigger(
                conn,
                req.job,
                req.scope,
                source=req.source,
                triggered_by=req.triggered_by,
                payload=req.payload,
                run_after=req.run_after,
                lock_timeout=lock_timeout,
            )
            runs += [
                {"job": req.job, "scope": req.scope, "run_id": i, "created": created}
                for i, created in ids
            ]
        return runs

    async def _enqueue_and_claim(
        self,
        conn: psycopg.AsyncConnection[Any],
        req: TriggerRequest,
        lock_timeout: str | None,
        claim: bool,
    ) -> list[dict[str, Any]]:
        """A lone request: the run it creates may be claimed for us by the
        same call (trigger_and_claim), and start on its answer."""
        snapshot = self._catalog.now  # the run starts with what its claim saw
        job_steps = snapshot.steps.get(req.job)  # as the claim records them
        first = job_steps[0].name if claim and job_steps and self._free_slot() else None
        # Taken before the claim is sent: the lease must hold from then on.
        token = self._lease.token()
        self._slots.starting += first is not None
        try:
            with self._slots.claims.track() if first is not None else nullcontext():
                made = await self._store.trigger_and_claim(
                    conn,
                    self._worker_id,
                    first,
                    req.job,
                    req.scope,
                    source=req.source,
                    triggered_by=req.triggered_by,
                    payload=req.payload,
                    lock_timeout=lock_timeout,
                )
                claimed_runs = [claimed for _, _, claimed in made if claimed is not None]
                if job_steps:  # set whenever a run was claimed: `first` needs it
                    for run in claimed_runs:
                        self._start_run(run, snapshot, "trigger", token)
        finally:
            self._slots.starting -= first is not None
        if first is not None and not claimed_runs:
            self._wake()  # the slot it held is free again
        if claimed_runs:
            # A turn of the loop: the step begins before trigger_enqueued's
            # line is written, which would hold it up by as long.
            await asyncio.sleep(0)
        return [
            {"job": req.job, "scope": req.scope, "run_id": run_id, "created": created}
            for run_id, created, _ in made
        ]
