"""Holds made by operators (pause(), resume(): control.py calls them): when
the next one ends, for the scheduler."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from syncworker.db import queries
from syncworker.db.base import StoreBase
from syncworker.db.rows import HoldEnd


class PauseQueries(StoreBase):
    async def next_hold_end(self, conn: psycopg.AsyncConnection[Any]) -> datetime | None:
        row = await queries.one(conn, self.q["next_hold_end"], None, HoldEnd)
        return None if row is None else row.until
