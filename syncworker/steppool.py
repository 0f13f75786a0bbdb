"""The pool steps borrow their connections from (`ctx.connection()`).

Apart from the worker's own pool, so a step can neither starve the worker
(hoarding connections: past `step_pool_size` it waits
`step_connect_timeout`, then gets psycopg_pool's PoolTimeout, an error in
its run) nor poison it: a connection comes back reset, whatever the step
did with it (`SET ROLE`, `SET default_transaction_read_only`, a session
setting, a temporary table, a transaction left open, autocommit switched
off). A connection that cannot be reset is discarded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from syncworker.config import Settings
from syncworker.daemon.connsettings import KEEPALIVES
from syncworker.db import session


async def reset(conn: psycopg.AsyncConnection[Any]) -> None:
    """Give the next step the connection the first one got."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        await conn.rollback()
    if not conn.autocommit:
        await conn.set_autocommit(True)
    for setter in (conn.set_read_only, conn.set_isolation_level, conn.set_deferrable):
        await setter(None)
    conn.row_factory = tuple_row
    conn.prepare_threshold = None
    # Session state of every kind: settings and SET ROLE, temporary tables,
    # prepared statements, LISTENs, advisory locks. psycopg forgets its own
    # prepared statements when it sees DISCARD ALL's command tag.
    await session.reset(conn)


def make_step_pool(
    settings: Settings,
    check: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]],
) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """`check` vets a connection before it is lent (the worker's: skipped
    for one used a moment ago with no outage seen since), so a step never
    gets one a database restart has cut."""
    return AsyncConnectionPool(
        settings.database_url,
        min_size=0,
        max_size=settings.step_pool_max,
        open=False,
        # No server-side prepared statements: DISCARD ALL would drop them,
        # and a transaction-mode pooler cannot keep them.
        kwargs={"autocommit": True, "prepare_threshold": None, **KEEPALIVES},
        reset=reset,
        check=check,
        timeout=settings.step_connect_timeout,
        name="syncworker-steps",
    )
