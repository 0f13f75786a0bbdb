"""A claimed run's writes: claim, steps, progress, retry, outcome.

Writes that conclude a run are fenced: they apply only while the run is
still `running` under this worker and attempt, so a worker that lost its run
to orphan recovery cannot overwrite the outcome.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from syncworker.counters import Counters
from syncworker.db import queries
from syncworker.db.base import StoreBase
from syncworker.db.rows import ClaimedRun, ClaimRow, FencedWrite, Requeued, RowId


def fence(run: ClaimedRun) -> dict[str, Any]:
    """The parameters of fragment run_fence."""
    return {"id": run.id, "worker": run.worker_id, "attempt": run.attempt}


class RunQueries(StoreBase):
    async def claim(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        jobs: Sequence[str],
        first_steps: Mapping[str, str] | None = None,
    ) -> ClaimedRun | None:
        """Take the oldest pending run whose key is not running anywhere.

        With `first_steps` (job -> name of its first step), the same statement
        records the start of the run's first step, as step_started() would.
        """
        try:
            row = await queries.one(
                conn,
                self.q["claim_next"],
                {
                    "worker": worker_id,
                    "jobs": list(jobs),
                    "events": self.events_channel,
                    "first": Jsonb(dict(first_steps or {})),
                },
                ClaimRow,
            )
        except psycopg.errors.UniqueViolation:
            # Another instance started a run of the same key between our
            # check and our update; the index refused ours. Nothing to claim.
            return None
        return None if row is None else row.run(worker_id)

    async def next_attempt(self, conn: psycopg.AsyncConnection[Any], run: ClaimedRun) -> bool:
        row = await queries.one(conn, self.q["next_attempt"], fence(run), RowId)
        return row is not None

    async def progress(
        self,
        conn: psycopg.AsyncConnection[Any],
        run: ClaimedRun,
        counters: Counters,
        step: str | None,
        *,
        publish: bool = False,
    ) -> bool:
        """Write the run's counters and current step if this worker still owns
        the run; with `publish`, also send a `run_progress` event."""
        params = {
            **fence(run),
            **counters.as_params(),
            "step": step,
            "events": self.events_channel,
            "publish": publish,
        }
        return await queries.one(conn, self.q["write_progress"], params, FencedWrite) is not None

    async def finish(
        self,
        conn: psycopg.AsyncConnection[Any],
        run: ClaimedRun,
        status: str,
        counters: Counters,
        error: str | None,
    ) -> bool:
        """Write the outcome if this worker still owns the run; publish the event."""
        params = {
            **fence(run),
            **counters.as_params(),
            "status": status,
            "error": error,
            "events": self.events_channel,
            "event": f"run_{status}",
        }
        return await queries.one(conn, self.q["finish_run"], params, FencedWrite) is not None

    async def requeue(
        self, conn: psycopg.AsyncConnection[Any], run: ClaimedRun, reason: str
    ) -> str | None:
        """Give an interrupted run back: `pending`, or `cancelled` when a
        follow-up run of the key is already pending (it will do the work).
        Returns the new status, or None if the run was no longer ours."""
        params = {**fence(run), "error": reason, "events": self.events_channel}
        row = await queries.one(conn, self.q["requeue_run"], params, Requeued)
        return None if row is None else str(row.status)

    async def step_started(
        self,
        conn: psycopg.AsyncConnection[Any],
        run: ClaimedRun,
        position: int,
        name: str,
        counters: Counters,
    ) -> int:
        """Record a step's start and name it the run's current step (with the
        run's counters so far, fenced like progress()); returns its row id."""
        params = {**fence(run), **counters.as_params(), "position": position, "step": name}
        row = await queries.one(conn, self.q["start_step"], params, RowId)
        assert row is not None
        return int(row.id)

    async def step_finished(
        self,
        conn: psycopg.AsyncConnection[Any],
        step_id: int,
        status: str,
        counters: Counters,
        error: str | None,
    ) -> None:
        await queries.none(
            conn,
            self.q["finish_step"],
            {"id": step_id, "status": status, "error": error, **counters.as_params()},
        )
