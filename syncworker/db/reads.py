"""What `status`, `/status` and `trigger --wait` read.

These rows stay dicts (psycopg's dict_row, by column name as well): they are
the JSON of `status --json` and `/status`, whose keys are the columns.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from syncworker.db import queries
from syncworker.db.base import StoreBase
from syncworker.db.rows import Allowed


class ReadQueries(StoreBase):
    async def may_read_payload(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Whether this role may select runs.payload (sql/007: the app role
        may not, and reads payloads per scope from run_payloads). True when
        there is no runs table: the read that follows says so."""
        row = await queries.one(conn, self.q["may_read_payload"], {"schema": self.schema}, Allowed)
        return row is None or bool(row.allowed)

    async def read_status(
        self, conn: psycopg.AsyncConnection[Any], *, limit: int, job: str | None
    ) -> dict[str, Any]:
        """Workers, jobs, recent runs, a summary, and the latest operators'
        actions. The runs have no `payload` key when this role may not read
        it, nor the whole `actions` key when it may not read those."""
        payload = await self.may_read_payload(conn)
        q = self.q
        runs = q["recent_runs"] if payload else q["recent_runs_no_payload"]
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(q["status_workers"].composed)
            workers = await cur.fetchall()
            await cur.execute(q["status_jobs"].composed, {"job": job})
            jobs = await cur.fetchall()
            await cur.execute(runs.composed, {"job": job, "limit": limit})
            recent = await cur.fetchall()
            await cur.execute(q["status_summary"].composed, {"job": job})
            summary = await cur.fetchone()
        status: dict[str, Any] = {
            "workers": workers,
            "jobs": jobs,
            "runs": recent,
            "summary": summary or {},
        }
        allowed = await queries.one(conn, q["may_read_actions"], {"schema": self.schema}, Allowed)
        if allowed is not None and allowed.allowed:  # else the key is left out
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(q["status_actions"].composed)
                status["actions"] = await cur.fetchall()
        return status

    async def read_run(
        self, conn: psycopg.AsyncConnection[Any], run_id: int, *, payload: bool | None = None
    ) -> dict[str, Any] | None:
        """One run's row; without `payload` when this role may not read it
        (asked of the database unless `payload` says)."""
        if payload is None:
            payload = await self.may_read_payload(conn)
        query = self.q["read_run"] if payload else self.q["read_run_no_payload"]
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query.composed, {"id": run_id})
            return await cur.fetchone()

    async def list_runs(
        self,
        conn: psycopg.AsyncConnection[Any],
        *,
        job: str | None,
        scope: str | None,
        status: str | None,
        before: int | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """A page of runs, newest first, below the id `before` when given;
        without `payload` when this role may not read it."""
        payload = await self.may_read_payload(conn)
        query = self.q["list_runs"] if payload else self.q["list_runs_no_payload"]
        params = {"job": job, "scope": scope, "status": status, "before": before, "limit": limit}
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query.composed, params)
            return await cur.fetchall()

    async def read_run_steps(
        self, conn: psycopg.AsyncConnection[Any], run_id: int
    ) -> list[dict[str, Any]]:
        """A run's steps, every attempt's, in the order they ran."""
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(self.q["run_steps"].composed, {"id": run_id})
            return await cur.fetchall()
