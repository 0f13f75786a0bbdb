"""Requests for runs: trigger(), plain, within a lock budget, or claiming."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from syncworker.db import queries
from syncworker.db.base import StoreBase
from syncworker.db.rows import ClaimedRun, Triggered, TriggeredAndClaimed


class EnqueueQueries(StoreBase):
    async def trigger(
        self,
        conn: psycopg.AsyncConnection[Any],
        job: str,
        scope: str | None = None,
        *,
        source: str = "python",
        triggered_by: str | None = None,
        payload: Mapping[str, Any] | None = None,
        scheduled_for: datetime | None = None,
        run_after: float | None = None,
        lock_timeout: str | None = None,
    ) -> list[tuple[int, bool]]:
        """trigger(); with `lock_timeout`, it raises LockNotAvailable rather
        than wait longer than that for a lock (fragment lock_budget)."""
        params: dict[str, Any] = {
            "job": job,
            "scope": scope,
            "source": source,
            "by": triggered_by,
            "payload": Jsonb(dict(payload or {})),
            "scheduled_for": scheduled_for,
            "run_after": None if run_after is None else timedelta(seconds=run_after),
        }
        if lock_timeout is None:
            query = self.q["trigger"]
        else:
            query = self.q["trigger_budgeted"]
            params["lock_timeout"] = lock_timeout
        rows = await queries.many(conn, query, params, Triggered)
        return [(int(r.run_id), bool(r.created)) for r in rows]

    async def trigger_and_claim(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        first_step: str | None,
        job: str,
        scope: str | None,
        *,
        source: str,
        triggered_by: str | None,
        payload: Mapping[str, Any],
        lock_timeout: str | None = None,
    ) -> list[tuple[int, bool, ClaimedRun | None]]:
        """trigger() for a worker that heard a NOTIFY: when this worker may
        take the run (`first_step` given) and the key has nothing pending,
        the run is inserted already claimed for it, with the first step's
        start, as claim() would write it (sql/006); otherwise plain trigger().
        Returns each run's id, whether it was created, and the run claimed
        for this worker, if any. A `lock_timeout` bounds its lock waits
        (fragment lock_budget)."""
        rows = await queries.many(
            conn,
            self.q["trigger_and_claim"],
            {
                "lock_timeout": lock_timeout,
                "me": worker_id,
                "first": first_step,
                "events": self.events_channel,
                "job": job,
                "scope": scope,
                "source": source,
                "by": triggered_by,
                "payload": Jsonb(dict(payload)),
            },
            TriggeredAndClaimed,
        )
        out: list[tuple[int, bool, ClaimedRun | None]] = []
        for row in rows:
            claimed = None
            if row.step_id is not None:
                assert row.max_attempts is not None
                claimed = ClaimedRun(
                    id=row.run_id,
                    job=job,
                    scope=scope,
                    source=source,
                    triggered_by=triggered_by,
                    payload=dict(payload),
                    scheduled_for=None,
                    attempt=1,
                    max_attempts=row.max_attempts,
                    worker_id=worker_id,
                    first_step_id=row.step_id,
                )
            out.append((int(row.run_id), bool(row.created), claimed))
        return out
