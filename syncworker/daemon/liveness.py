"""Liveness: the worker's proof to its peers that it is alive and owns its
runs, and its judgement of theirs.

- the liveness lock, a session advisory lock held on the listening session
  (PostgreSQL frees it when the session dies, which is how peers see death);
- the heartbeat, every heartbeat_interval / 6 on a fixed deadline: it
  renews the lease (lease.py) and returns which runs the database still has
  as ours, so a run taken over while we were cut off is fenced;
- orphan recovery, every heartbeat_interval / 4: runs of workers judged gone
  (each by its own takeover_after, sql/009) are retried or failed, and
  their reservations cleared.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker.aio import wait_event
from syncworker.daemon.connsettings import MAX_BACKOFF
from syncworker.daemon.lifecycle import Lifecycle
from syncworker.daemon.slots import Slots
from syncworker.db import Store
from syncworker.dberrors import TRANSIENT_OR_TIMEOUT, first_line
from syncworker.lease import Lease
from syncworker.orchestrator import RunEnv
from syncworker.version import VERSION

# How long after a change of state (idle, running, draining) it is written.
STATE_SETTLE = 0.2

Connect = Callable[..., AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class Liveness:
    def __init__(
        self,
        *,
        worker_id: str,
        store: Store,
        slots: Slots[RunEnv],
        lease: Lease,
        life: Lifecycle,
        connect: Connect,
        log: FilteringBoundLogger,
        cancel_run: Callable[[int, str], None],
        on_reserved: Callable[[int], None],
        wake: Callable[[], None],
        sd_status: Callable[[str], None],
    ) -> None:
        self._worker_id = worker_id
        self._store = store
        self._slots = slots
        self._lease = lease
        self._life = life
        self._connect = connect
        self._log = log
        self._cancel_run = cancel_run
        self._on_reserved = on_reserved
        self._wake = wake
        self._sd_status = sd_status
        self._changed = asyncio.Event()
        self._lock_key: int | None = None
        # Set when the liveness session was re-established: the next beat
        # checks at once which runs are still ours.
        self._recheck = False
        # Until then, other workers' missing locks and stale heartbeats prove
        # nothing: we have just reconnected, and so may they be about to.
        self._judge_peers_at = 0.0

    def changed(self) -> None:
        """The worker's state may have changed: write it (within STATE_SETTLE)."""
        self._changed.set()

    async def register(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Insert this worker's row, with the silences after which peers may
        take its runs; its heartbeat_at, now(), starts the lease."""
        sent = time.monotonic()
        self._lock_key = await self._store.register_worker(
            conn,
            self._worker_id,
            socket.gethostname(),
            os.getpid(),
            VERSION,
            takeover_after=self._lease.timing.takeover_after,
            stale_after=self._lease.timing.stale_after,
        )
        self._lease.renew(sent, time.monotonic())

    async def hold_lock(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """On each new listening session: take the liveness lock on it."""
        assert self._lock_key is not None
        await self._store.hold_liveness_lock(conn, self._lock_key)

    def reconnected(self, serving: bool) -> None:
        """The listening session is back: check our runs at the next beat,
        and, after an outage while serving, judge no peer for a while (the
        outage may have cut every session)."""
        self._recheck = True
        if serving:
            self._judge_peers_at = asyncio.get_running_loop().time() + self.peer_grace()

    def state(self) -> str:
        if self._life.stopping.is_set():
            return "draining"
        return "running" if self._slots.busy() else "idle"

    async def run(self) -> None:
        """Beat every renew_every (heartbeat_interval / 6) on a fixed deadline,
        renewing the lease, and write state changes within STATE_SETTLE; look
        for runs to take over every recover_every. State changes never push
        the deadline back: a busy worker must keep beating, or its lease
        lapses and others would take its live runs."""
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self._lease.timing.renew_every
        next_sweep = loop.time() + self._lease.timing.recover_every
        last_state = ""
        while True:
            await wait_event(self._changed, max(0.0, next_beat - loop.time()))
            if loop.time() < next_beat and not self._recheck:
                # A state change: write where the state settles. Runs of a few
                # milliseconds flip it twice each, and two writes per run were
                # a third of a short run's statements, taken while it started.
                await asyncio.sleep(min(STATE_SETTLE, next_beat - loop.time()))
            self._changed.clear()
            timing = self._lease.timing  # read each time: a reload may change it
            due = loop.time() >= next_beat
            if due:
                next_beat = loop.time() + timing.renew_every
            sweep = loop.time() >= next_sweep
            if sweep:
                next_sweep = loop.time() + timing.recover_every
            if not self._life.db_up.is_set():
                continue
            recheck, self._recheck = self._recheck, False
            due = due or recheck
            sweep = sweep or recheck
            state = self.state()
            changed = state != last_state
            try:
                # A write that cannot be made within the lease is retried on
                # another connection rather than awaited past it.
                async with asyncio.timeout(timing.self_fence_after) as deadline:
                    async with self._connect() as conn:
                        if due or changed:
                            await self._beat(conn, state, recheck, last_state)
                            last_state = state
                        deadline.reschedule(None)
                        if sweep:
                            await self._recover(conn)
            except TRANSIENT_OR_TIMEOUT as exc:
                error = first_line(exc, "timed out")
                self._log.warning("heartbeat_failed", error=error)
                continue
            if sweep and state != "draining":
                self._wake()  # safety net: a missed wake-up costs one sweep at most
            if state != "draining" and (sweep or changed):
                self._sd_status(state)

    async def _beat(
        self, conn: psycopg.AsyncConnection[Any], state: str, recheck: bool, last_state: str
    ) -> None:
        """One heartbeat write: renews the lease from its send time, and fences
        the runs the database no longer has under this worker."""
        # Runs claimed after this snapshot are ours for sure.
        in_flight = list(self._slots.runs)
        sent = time.monotonic()
        owned = await self._store.heartbeat(conn, self._worker_id, state)
        was_valid = self._lease.valid()
        self._lease.renew(sent, time.monotonic())
        if not was_valid and self._lease.valid():
            self._log.debug("lease_renewed", after_lapse=True)
            self._wake()  # claims wait for a valid lease
        self._fence(in_flight, owned)
        if recheck:
            # Reserved while we were not listening: the
            # notification is lost, the reservation is not.
            for run_id in await self._store.reserved_runs(conn, self._worker_id):
                self._on_reserved(run_id)
        if state == "draining" != last_state:
            # We take no reservation from now on.
            await self._store.release_reserved(
                conn, self._worker_id, keep=[*self._slots.runs, *self._slots.deciding]
            )

    def on_lease_lapsed(self) -> None:
        """No heartbeat write was confirmed in time: a peer may take our runs
        over once takeover_after has passed since the last one, so every
        run's step stops now (each run logs run_self_fenced and puts itself
        back to pending if the database still has it as ours)."""
        runs = [
            run_id
            for run_id, env in self._slots.envs.items()
            if not env.settling.is_set() and env.token is not None and not env.token.valid()
        ]
        (self._log.warning if runs else self._log.debug)(
            "lease_lapsed",
            runs=sorted(runs),
            self_fence_after=self._lease.timing.self_fence_after,
        )
        for run_id in runs:
            # Child processes (isolation = "process") are killed at once too.
            self._cancel_run(run_id, "self-fenced")

    def _fence(self, in_flight: Sequence[int], owned: set[int]) -> None:
        """Stop running what the database says is no longer ours: our liveness
        session died for a moment and another worker took the run back."""
        for run_id in in_flight:
            task, env = self._slots.runs.get(run_id), self._slots.envs.get(run_id)
            if run_id in owned or task is None or env is None or env.settling.is_set():
                continue
            self._log.warning("run_fenced", run_id=run_id, reason="no longer owned by this worker")
            env.lost.set()
            self._cancel_run(run_id, "fenced")

    def peer_grace(self) -> float:
        """How long a live worker may need to take its lock and beat again
        after an outage: its listener's longest back-off, then a stale span."""
        return MAX_BACKOFF + self._lease.timing.stale_after

    async def _recover(self, conn: psycopg.AsyncConnection[Any]) -> None:
        recovered = await self._store.recover_orphans(
            conn,
            self._worker_id,
            self._lease.timing.stale_after,
            list(self._slots.runs),
            judge_peers=asyncio.get_running_loop().time() >= self._judge_peers_at,
            peer_grace=self.peer_grace(),
            takeover_after=self._lease.timing.takeover_after,
        )
        for row in recovered:
            self._log.warning(
                "run_recovered",
                run_id=row["id"],
                job=row["job"],
                scope=row["scope"],
                status=row["status"],
                reason="worker lost",
            )
        unreserved = await self._store.unreserve_gone(
            conn,
            self._worker_id,
            self._lease.timing.stale_after,
            judge_peers=asyncio.get_running_loop().time() >= self._judge_peers_at,
            peer_grace=self.peer_grace(),
            takeover_after=self._lease.timing.takeover_after,
        )
        if recovered or unreserved:
            self._wake()

    async def mark_stopped(self) -> None:
        if self._lock_key is None:
            return
        try:
            async with self._connect(timeout=5.0) as conn:
                await self._store.heartbeat(conn, self._worker_id, "stopped")
                await self._store.release_reserved(conn, self._worker_id)
        except TRANSIENT_OR_TIMEOUT as exc:
            self._log.warning("heartbeat_failed", error=first_line(exc))
