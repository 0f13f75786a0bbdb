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
                    # timeout=0: what earlier statements read (psycopg keeps
                    # it aside) and what the socket holds now, without waiting.
                    async for notify in conn.notifies(timeout=0):
                        await on_notify(notify)
                    if not await _readable(conn, ping_every):
                        # Quiet for a while: prove the session is still there.
                        await conn.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            if disconnected_since is None:
                disconnected_since = loop.time()
                on_state(False)
                log.warning("db_disconnected", error=_first_line(exc))


async def _readable(conn: psycopg.AsyncConnection[Any], timeout: float) -> bool:
    """Wait until the session has something to read, or `timeout`.

    The wait of psycopg's notifies() wakes every 0.1 s to look for an
    interrupt: ten wake-ups a second, which were most of an idle worker's
    CPU time. This one sleeps until the socket is readable.
    """
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = conn.fileno()
    loop.add_reader(fd, wake)
    try:
        async with asyncio.timeout(timeout):
            await ready
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
