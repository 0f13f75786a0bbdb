"""Steps that misuse their borrowed connection (tests/daemon/test_step_pool.py)."""

from __future__ import annotations

from syncworker import SyncContext


async def poison(ctx: SyncContext) -> None:
    """Leave behind everything a connection can carry to its next user."""
    async with ctx.connection() as conn:
        await conn.execute("CREATE TEMP TABLE leftover (x int)")
        await conn.execute("SELECT pg_advisory_lock(424242)")
        await conn.execute("SET default_transaction_read_only = on")
        await conn.execute("SET search_path = nowhere")
        await conn.execute("SET statement_timeout = '7s'")
        await conn.set_autocommit(False)
        await conn.execute("SELECT 1")  # a transaction, left open


async def inspect(ctx: SyncContext) -> None:
    """Record what a fresh borrower of a step connection finds."""
    async with ctx.connection() as conn:
        cur = await conn.execute(
            "SELECT current_setting('default_transaction_read_only'),"
            " current_setting('search_path'), current_setting('statement_timeout'),"
            " to_regclass('pg_temp.leftover') IS NULL,"
            " NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
            "             AND objid = 424242 AND pid = pg_backend_pid())"
        )
        row = await cur.fetchone()
        assert row is not None
        await conn.execute(
            "INSERT INTO test_log (run_id, job, step, payload)"
            " VALUES (%s, %s, 'inspect',"
            " json_build_array(%s::text, %s::text, %s::text, %s::bool, %s::bool))",
            (ctx.run_id, ctx.job, *row),
        )


async def hoard(ctx: SyncContext) -> None:
    """Borrow one connection more than the step pool holds."""
    async with ctx.connection(), ctx.connection():
        pass
