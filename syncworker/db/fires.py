"""Cron fires: the misfire baseline, one claim per fire, the next fires."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from syncworker.db import queries
from syncworker.db.base import StoreBase
from syncworker.db.rows import ClaimedFire, EnqueuedFire, FireState


class FireQueries(StoreBase):
    async def fire_state(self, conn: psycopg.AsyncConnection[Any]) -> dict[str, datetime | None]:
        rows = await queries.many(conn, self.q["fire_state"], None, FireState)
        return {r.name: r.last_fire_at for r in rows}

    async def enqueue_fire(
        self,
        conn: psycopg.AsyncConnection[Any],
        job: str,
        fire: datetime,
        *,
        run: bool,
    ) -> list[tuple[int, bool]] | None:
        """Claim one cron fire for this instance and, if `run`, enqueue its runs.

        Returns None when another instance (or an earlier life of this one)
        claimed the fire already. The claim and the enqueue commit together,
        so a worker dying in between leaves the fire to the others.
        """
        if not run:
            claimed = await queries.one(
                conn, self.q["claim_fire"], {"fire": fire, "job": job}, ClaimedFire
            )
            return None if claimed is None else []
        rows = await queries.many(
            conn,
            self.q["enqueue_fire"],
            {"fire": fire, "job": job, "payload": Jsonb({})},
            EnqueuedFire,
        )
        if not rows:
            return None
        return [(int(r.run_id), bool(r.created)) for r in rows if r.run_id is not None]

    async def enqueue_missed_fires(
        self,
        conn: psycopg.AsyncConnection[Any],
        job: str,
        fires: Sequence[datetime],
    ) -> list[int] | None:
        """misfire = "all": claim the latest of `fires` (oldest first) and
        queue a backfill run per fire, as one statement; the runs queued, or
        None when another instance claimed the fire already."""
        rows = await queries.many(
            conn,
            self.q["enqueue_missed_fires"],
            {"fire": fires[-1], "job": job, "fires": list(fires)},
            EnqueuedFire,
        )
        if not rows:
            return None
        return [int(r.run_id) for r in rows if r.run_id is not None]

    async def set_next_fire(
        self, conn: psycopg.AsyncConnection[Any], fires: Mapping[str, datetime | None]
    ) -> None:
        if not fires:
            return
        await queries.none(
            conn, self.q["set_next_fire"], {"names": list(fires), "nexts": list(fires.values())}
        )
