"""The worker's connections: its own pool, the steps' pool (steppool.py),
and which connections were used well a moment ago (lent without a check).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psycopg
from psycopg.pq import ConnStatus
from psycopg_pool import AsyncConnectionPool

from syncworker.config import Settings
from syncworker.daemon.connsettings import KEEPALIVES
from syncworker.steppool import make_step_pool

RECONNECT_ATTEMPT = 10.0
# A pooled connection that completed its work less than this long ago, with
# no outage seen since, is handed out without the pool's check: a round trip
# that cost as much again as the claim it preceded. One that died within the
# window fails its statement with the OperationalError every caller handles
# already, and the pool drops it.
CHECK_IDLE_AFTER = 1.0
# How long closing a pool waits for its connection attempts in flight.
POOL_CLOSE = 0.5

Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]


class Pools:
    def __init__(self, settings: Settings) -> None:
        self._used_at: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )
        self._own: Pool = AsyncConnectionPool(
            settings.database_url,
            min_size=1,
            max_size=settings.concurrency * 2 + 2,
            open=False,
            # Behind a transaction-mode pooler a connection is another
            # server's at each transaction: no server-side prepared statements.
            kwargs={
                "autocommit": True,
                **KEEPALIVES,
                **({"prepare_threshold": None} if settings.pooler == "transaction" else {}),
            },
            check=self._check,
            timeout=10.0,
            # psycopg_pool doubles the delay between connection attempts with
            # no cap for as long as one attempt lasts: under an infinite
            # timeout a long outage left hours between tries. A finite one
            # ends the attempt, and the next checkout starts a fresh one at
            # once, so the pool is never more than a few seconds behind the
            # listener, which reconnects on its own capped back-off.
            reconnect_timeout=RECONNECT_ATTEMPT,
            name="syncworker",
        )
        self._steps: Pool = make_step_pool(settings, self._check)

    async def open(self) -> None:
        await self._own.open(wait=False)
        await self._steps.open(wait=False)

    async def close(self) -> None:
        # Not the default 5 s: a connection attempt to a database that
        # is down must not hold the exit (nothing is left to write).
        await self._steps.close(timeout=POOL_CLOSE)
        await self._own.close(timeout=POOL_CLOSE)

    def outage(self) -> None:
        """The database went away: every pooled connection may be dead."""
        self._used_at.clear()

    def connect(
        self, timeout: float | None = None
    ) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """One of the worker's own connections."""
        return self._lend(self._own, timeout)

    def step_connect(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A connection for a step (steppool.py): never one of the worker's own."""
        return self._lend(self._steps, None)

    @asynccontextmanager
    async def _lend(
        self, pool: Pool, timeout: float | None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """From `pool`, noting when it was last used well (_check)."""
        async with pool.connection(timeout=timeout) as conn:
            try:
                yield conn
            except BaseException:
                self._used_at.pop(conn, None)
                raise
            self._used_at[conn] = time.monotonic()

    async def _check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        used = self._used_at.get(conn)
        if (
            used is not None
            and time.monotonic() - used < CHECK_IDLE_AFTER
            and conn.pgconn.status == ConnStatus.OK
        ):
            return
        await AsyncConnectionPool.check_connection(conn)
