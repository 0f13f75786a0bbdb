"""The dedicated LISTEN connection: connect, listen, reconnect with backoff.

It does nothing but listen (plus holding the worker's liveness lock, taken
once per connection in `on_connect`), because PostgreSQL delivers
notifications only between transactions of the listening session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from structlog.typing import FilteringBoundLogger

OnConnect = Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]
OnNotify = Callable[[psycopg.Notify], Awaitable[None]]
OnState = Callable[[bool], None]

INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 10.0
# TCP keepalives find a silently dead server (host loss) without polling.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


async def listen_forever(
    conninfo: str,
    channels: Sequence[str],
    *,
    log: FilteringBoundLogger,
    on_connect: OnConnect,
    on_notify: OnNotify,
    on_state: OnState,
    ping_every: float,
) -> None:
    """Listen until cancelled, reconnecting with capped exponential backoff."""
    delay = INITIAL_BACKOFF
    disconnected_since: float | None = None
    loop = asyncio.get_running_loop()
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **KEEPALIVES)
        except psycopg.OperationalError as exc:
            if disconnected_since is None:
                disconnected_since = loop.time()
                on_state(False)
                log.warning("db_disconnected", error=_first_line(exc))
            log.debug("db_reconnect_failed", retry_in=delay, error=_first_line(exc))
            await asyncio.sleep(delay)  # backoff between reconnect attempts
            delay = min(delay * 2, MAX_BACKOFF)
            continue
        try:
            async with conn:
                for channel in channels:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                await on_connect(conn)
                delay = INITIAL_BACKOFF
                if disconnected_since is not None:
                    log.info(
                        "db_reconnected",
                        down_ms=round((loop.time() - disconnected_since) * 1000),
                    )
                    disconnected_since = None
                on_state(True)
                while True:
                    async for notify in conn.notifies(timeout=ping_every):
                        await on_notify(notify)
                    # Quiet for a while: prove the session is still there.
                    await conn.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            if disconnected_since is None:
                disconnected_since = loop.time()
                on_state(False)
                log.warning("db_disconnected", error=_first_line(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
