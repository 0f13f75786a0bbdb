"""Holds made by operators (pause(), resume(): control.py calls them), and
when the next wait ends (a hold's until, a delayed run's not_before), for the
scheduler."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from syncworker.db import queries
from syncworker.db.base import StoreBase
from syncworker.db.rows import Held, HoldEnd


class PauseQueries(StoreBase):
    async def key_held(
        self, conn: psycopg.AsyncConnection[Any], job: str, scope: str | None
    ) -> bool:
        row = await queries.one(conn, self.q["key_held"], {"job": job, "scope": scope}, Held)
        return row is not None and row.held

    async def next_release(self, conn: psycopg.AsyncConnection[Any]) -> datetime | None:
        row = await queries.one(conn, self.q["next_release"], None, HoldEnd)
        return None if row is None else row.until
