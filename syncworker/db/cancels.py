"""Runs an operator cancelled: the request a worker confirms before it stops
one of its runs (control.py asks for cancels)."""

from __future__ import annotations

from typing import Any

import psycopg

from syncworker.db import queries
from syncworker.db.base import StoreBase
from syncworker.db.rows import CancelWhy


class CancelQueries(StoreBase):
    async def cancel_request(self, conn: psycopg.AsyncConnection[Any], run_id: int) -> str | None:
        """Why run `run_id` was cancelled (`cancelled by WHO[: REASON]`), or
        None when nobody asked."""
        row = await queries.one(conn, self.q["cancel_request"], {"id": run_id}, CancelWhy)
        return None if row is None else row.why
