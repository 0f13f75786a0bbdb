"""An employee sync in three steps: snapshot, history, change detection.

Each step commits on its own, and a failed attempt is retried from the first
step. So every step keys its work on the run (`ctx.run_id`) and can be redone:
a retry finds the history the first attempt already wrote and reports the
same changes, not none.

The run's counters tell the story of the employees: `total` and `processed`
are the employees seen, `inserted` the hires, `updated` the changes and
`deleted` the leavers.
"""

from __future__ import annotations

from typing import Any

from syncworker import SyncContext


async def fetch_employees(ctx: SyncContext) -> list[tuple[Any, ...]]:
    """Stands in for the HR system's API (paged HTTP calls in real life)."""
    async with ctx.connection() as conn:
        cur = await conn.execute(
            "SELECT employee_id, name, department, title FROM hr_employees ORDER BY employee_id"
        )
        return await cur.fetchall()


async def snapshot(ctx: SyncContext) -> None:
    """Step 1: replace the staging table with what the source says now."""
    rows = await fetch_employees(ctx)
    ctx.total(len(rows))
    async with ctx.connection() as conn, conn.transaction():
        if not rows:
            # An empty answer is far more often an outage than a company
            # without staff, and would record everyone as having left.
            cur = await conn.execute("SELECT count(*) FROM employee_history WHERE valid_to IS NULL")
            row = await cur.fetchone()
            if row and row[0]:
                raise RuntimeError("the source returned no employees; refusing the snapshot")
        await conn.execute("DELETE FROM employee_staging")
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO employee_staging"
                " (employee_id, name, department, title, run_id, taken_at)"
                " VALUES (%s, %s, %s, %s, %s, now())",
                [(*row, ctx.run_id) for row in rows],
            )
    ctx.count(processed=len(rows))
    ctx.log.info("snapshot_taken", employees=len(rows))


async def record_history(ctx: SyncContext) -> None:
    """Step 2: close the versions the snapshot no longer matches, open new ones."""
    params = {"run": ctx.run_id}
    async with ctx.connection() as conn, conn.transaction():
        closed = await conn.execute(
            """
            UPDATE employee_history h
            SET valid_to = coalesce((SELECT max(taken_at) FROM employee_staging), now()),
                closed_by = %(run)s
            WHERE h.valid_to IS NULL AND NOT EXISTS (
                SELECT 1 FROM employee_staging s
                WHERE s.employee_id = h.employee_id
                  AND (s.name, s.department, s.title) = (h.name, h.department, h.title))
            """,
            params,
        )
        opened = await conn.execute(
            """
            INSERT INTO employee_history
                (employee_id, name, department, title, valid_from, opened_by)
            SELECT s.employee_id, s.name, s.department, s.title, s.taken_at, %(run)s
            FROM employee_staging s
            WHERE NOT EXISTS (
                SELECT 1 FROM employee_history h
                WHERE h.employee_id = s.employee_id AND h.valid_to IS NULL)
            """,
            params,
        )
    ctx.log.info("history_recorded", opened=opened.rowcount, closed=closed.rowcount)


_DETECT = """
WITH opened AS (
    SELECT * FROM employee_history
    WHERE opened_by = %(run)s AND closed_by IS DISTINCT FROM %(run)s
), closed AS (
    SELECT * FROM employee_history WHERE closed_by = %(run)s AND opened_by <> %(run)s
)
INSERT INTO employee_changes (run_id, employee_id, change, fields)
SELECT %(run)s, employee_id,
       CASE WHEN c.id IS NULL THEN 'hired' WHEN o.id IS NULL THEN 'left' ELSE 'changed' END,
       CASE WHEN o.id IS NULL OR c.id IS NULL THEN '{}'::jsonb ELSE jsonb_strip_nulls(
           jsonb_build_object(
               'name', CASE WHEN o.name <> c.name
                            THEN jsonb_build_array(c.name, o.name) END,
               'department', CASE WHEN o.department <> c.department
                                  THEN jsonb_build_array(c.department, o.department) END,
               'title', CASE WHEN o.title <> c.title
                             THEN jsonb_build_array(c.title, o.title) END)) END
FROM opened o FULL JOIN closed c USING (employee_id)
ON CONFLICT (run_id, employee_id) DO NOTHING
"""


async def detect_changes(ctx: SyncContext) -> None:
    """Step 3: what this run's history says happened, one row per employee."""
    params = {"run": ctx.run_id}
    async with ctx.connection() as conn, conn.transaction():
        await conn.execute(_DETECT, params)
        # Counted from the table, not from this INSERT: a retried run's
        # first attempt may have written them already.
        cur = await conn.execute(
            "SELECT change, count(*) FROM employee_changes WHERE run_id = %(run)s GROUP BY change",
            params,
        )
        found = {change: int(n) for change, n in await cur.fetchall()}
    hired, changed, left = (found.get(k, 0) for k in ("hired", "changed", "left"))
    # processed=0: the employees were counted as processed by the snapshot.
    ctx.count(inserted=hired, updated=changed, deleted=left, processed=0)
    ctx.log.info("changes_detected", hired=hired, changed=changed, left=left)
