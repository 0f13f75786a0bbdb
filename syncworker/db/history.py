"""Pruning the history of finished runs (pruning.py drives it)."""

from __future__ import annotations

from typing import Any

import psycopg

from syncworker.db import queries
from syncworker.db.base import StoreBase
from syncworker.db.rows import MaxId


class HistoryQueries(StoreBase):
    async def prune_history(
        self, conn: psycopg.AsyncConnection[Any], days: float, after: int, until: int
    ) -> int:
        """Delete the finished runs older than `days` whose id is in
        (`after`, `until`], but the newest of each key; returns how many."""
        params = {"days": days, "after": after, "until": until}
        return await queries.rowcount(conn, self.q["prune_history"], params)

    async def max_run_id(self, conn: psycopg.AsyncConnection[Any]) -> int:
        row = await queries.one(conn, self.q["max_run_id"], None, MaxId)
        return int(row.max_id) if row is not None else 0
