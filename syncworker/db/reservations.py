"""Runs trigger() reserved for one worker (sql/005, sql/007): claimed from
the run's row, or given back to the others."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from syncworker.db import queries
from syncworker.db.base import StoreBase
from syncworker.db.rows import ClaimedRun, Released, ReservedClaimRow, RowId


class ReservationQueries(StoreBase):
    async def claim_reserved(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        run_id: int,
        jobs: Sequence[str],
        first_steps: Mapping[str, str],
        lock_timeout: str | None = None,
    ) -> ClaimedRun | None:
        """Claim run `run_id` if trigger() reserved it for this worker and it
        is still pending, recording its first step's start as claim() does;
        the run as its row says, or None when it is not ours to start. A
        reservation that cannot be taken (its key is running elsewhere, its
        job is not run here) is given back to the others."""
        try:
            row = await queries.one(
                conn,
                self.q["claim_reserved"],
                {
                    "lock_timeout": lock_timeout,
                    "id": run_id,
                    "worker": worker_id,
                    "jobs": list(jobs),
                    "first": Jsonb(dict(first_steps)),
                    "events": self.events_channel,
                    "wake": self.wake,
                },
                ReservedClaimRow,
            )
        except psycopg.errors.UniqueViolation:
            # A run of the key is running after all: not ours to start now.
            await self.release_reserved(conn, worker_id, only=run_id)
            return None
        return None if row is None else row.run(worker_id)

    async def reserved_runs(self, conn: psycopg.AsyncConnection[Any], worker_id: str) -> list[int]:
        """Ids of the runs reserved for this worker and not claimed yet (for
        those whose notification it may not have heard)."""
        rows = await queries.many(conn, self.q["reserved_runs"], {"worker": worker_id}, RowId)
        return [int(r.id) for r in rows]

    async def release_reserved(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        *,
        only: int | None = None,
        keep: Sequence[int] = (),
    ) -> int:
        """Give back runs reserved for this worker (all, or `only` one), except
        those in `keep`, and wake the workers to claim them; returns how many."""
        row = await queries.one(
            conn,
            self.q["release_reserved"],
            {"worker": worker_id, "only": only, "keep": list(keep), "wake": self.wake},
            Released,
        )
        return int(row.released) if row is not None else 0

    async def offer(
        self,
        conn: psycopg.AsyncConnection[Any],
        worker_id: str,
        concurrency: int,
        first_steps: Mapping[str, str],
        *,
        reserve_by_id: bool = False,
    ) -> None:
        """Tell trigger() what this worker takes reservations for: its slots
        and each enabled job's first step. `reserve_by_id`: it claims a
        reservation from the run's row, reading only the run's id off the
        wake (sql/007); trigger() reserves for no other worker."""
        await queries.none(
            conn,
            self.q["offer"],
            {
                "id": worker_id,
                "concurrency": concurrency,
                "first": Jsonb(dict(first_steps)),
                "by_id": reserve_by_id,
            },
        )
