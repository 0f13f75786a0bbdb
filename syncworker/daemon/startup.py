"""Startup: migrate, register the jobs and this worker, and prove that
NOTIFYs reach the listening session, waiting out a database outage; a
refusal retrying cannot mend (a wrong role, database or password, a
transaction-mode pooler in the listener's way) ends it with a ConfigError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker.aio import cancel_and_wait, wait_event
from syncworker.config import ConfigError, Settings
from syncworker.daemon.catalog import Catalog
from syncworker.daemon.connsettings import KEEPALIVES
from syncworker.db import Store
from syncworker.dberrors import TRANSIENT, config_problem, first_line
from syncworker.listenprobe import notifications_arrive

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]
OnConnection = Callable[[psycopg.AsyncConnection[Any]], Awaitable[Any]]


class Startup:
    def __init__(
        self,
        *,
        settings: Callable[[], Settings],
        config_source: str,
        store: Store,
        catalog: Catalog,
        stopping: asyncio.Event,
        connect: Connect,
        log: FilteringBoundLogger,
        register: OnConnection,
        offer: OnConnection,
        start_fires: Callable[[Mapping[str, datetime | None]], None],
    ) -> None:
        self._settings = settings
        self._config_source = config_source
        self._store = store
        self._catalog = catalog
        self._stopping = stopping
        self._connect = connect
        self._log = log
        self._register = register
        self._offer = offer
        self._start_fires = start_fires

    async def run(self) -> bool:
        """Migrate, register jobs and this worker; wait out a database outage.
        A stop ends the wait at once, even inside a connection attempt."""
        attempt = asyncio.ensure_future(self._start_attempts())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({attempt, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not attempt.done():
            await cancel_and_wait([attempt])
            return False
        return attempt.result()

    async def _start_attempts(self) -> bool:
        delay = 0.2
        down = False
        while not self._stopping.is_set():
            try:
                async with self._connect() as conn:
                    scopes = await self._store.setup(
                        conn, self._settings().jobs, self._config_source
                    )
                    self._catalog.replace(self._catalog.now.with_scopes(scopes))
                    await self._register(conn)
                    await self._offer(conn)
                    self._start_fires(await self._store.fire_state(conn))
                if self._settings().listen:
                    await self._check_listening()
                if down:
                    self._log.info("db_reconnected")
                return True
            except TRANSIENT as exc:
                # The pool's timeout hides why its connections failed: ask
                # the server directly, so a refusal that retrying cannot
                # mend (a wrong role, database or password) ends the start.
                await self._refuse_bad_settings()
                if not down:
                    self._log.warning("db_disconnected", error=first_line(exc))
                    down = True
                await wait_event(self._stopping, delay)
                delay = min(delay * 2, 10.0)
        return False

    async def _check_listening(self) -> None:
        """ConfigError (exit 78) if NOTIFYs cannot reach the listening session
        (listenprobe.py): a transaction-mode pooler in its way."""
        if await notifications_arrive(self._settings().listen_conninfo, KEEPALIVES):
            return
        key = "listen_url" if self._settings().listen_url else "database_url"
        raise ConfigError(
            self._config_source,
            key,
            "a NOTIFY sent on this connection never came back to it, so no trigger would"
            " be heard (a transaction-mode pooler such as PgBouncer?): set listen_url to"
            ' a direct connection to PostgreSQL and pooler = "transaction", or'
            " listen = false to poll every poll_interval seconds instead",
        )

    async def _refuse_bad_settings(self) -> None:
        """Raise ConfigError (exit 78) with the server's reason if it refuses
        our connection settings; return for an outage or success."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._settings().database_url, autocommit=True, **KEEPALIVES
            )
        except psycopg.Error as exc:
            reason = config_problem(exc)
            if reason is not None:
                raise ConfigError(
                    self._config_source, "database_url", f"the server refused it: {reason}"
                ) from None
            return
        await conn.close()
