"""The LISTEN session: connect, listen, reconnect with backoff (or, with
`listen = false`, the poll that stands in for it).

Besides listening it holds the worker's liveness lock (taken once per
connection in `on_connect`), and `on_notify` may run statements on it when
the notification came alone, as the worker does to enqueue a NOTIFY trigger:
this session has just woken to deliver the NOTIFY, where a pooled one has
often idled for as long as the worker, and the call took 0.25 ms longer
there. PostgreSQL delivers notifications between transactions, so others
wait while a statement runs and are read with its result.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker.config import Settings
from syncworker.daemon.connsettings import INITIAL_BACKOFF, KEEPALIVES, MAX_BACKOFF
from syncworker.db import session
from syncworker.dberrors import TRANSIENT, first_line

OnConnect = Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]
# Called with the listening session, free to run statements on until it
# returns; None unless the notification came alone (see listen_forever).
OnNotify = Callable[[psycopg.AsyncConnection[Any] | None, psycopg.Notify], Awaitable[None]]
OnState = Callable[[bool], None]


async def listen_forever(
    conninfo: str,
    channels: Sequence[str],
    *,
    log: FilteringBoundLogger,
    on_connect: OnConnect,
    on_notify: OnNotify,
    on_state: OnState,
    ping_every: float,
    ping_deadline: float,
) -> None:
    """Listen until cancelled, reconnecting with capped exponential backoff.

    Quiet for `ping_every`, the session is pinged; a ping unanswered within
    `ping_deadline` counts as a lost connection (a stalled network)."""
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
                log.warning("db_disconnected", error=first_line(exc))
            log.debug("db_reconnect_failed", retry_in=delay, error=first_line(exc))
            await asyncio.sleep(delay)  # backoff between reconnect attempts
            delay = min(delay * 2, MAX_BACKOFF)
            continue
        # What statements on the session read along with their results: the
        # handler takes it, psycopg keeps nothing aside.
        heard: deque[psycopg.Notify] = deque()
        conn.add_notify_handler(heard.append)
        try:
            async with conn:
                for channel in channels:
                    await session.listen(conn, channel)
                await on_connect(conn)
                delay = INITIAL_BACKOFF
                if disconnected_since is not None:
                    log.info(
                        "db_reconnected",
                        down_ms=round((loop.time() - disconnected_since) * 1000),
                    )
                    disconnected_since = None
                on_state(True)
                # A statement on the session reads, before its result, every
                # notification the server holds for it: in a burst, thousands,
                # into memory. So the session is offered only for a
                # notification that came alone; a burst waits in the server.
                alone = False
                while True:
                    while heard:
                        notify = heard.popleft()
                        await on_notify(conn if alone and not heard else None, notify)
                        alone = False
                    if await _readable(conn, ping_every):
                        batch = _read(conn)
                        alone = len(batch) == 1
                        heard.extend(batch)
                    else:
                        # Quiet for a while: prove the session is still there.
                        heard.extend(await _ping(conn, ping_deadline))
                        alone = False
        except psycopg.OperationalError as exc:
            if disconnected_since is None:
                disconnected_since = loop.time()
                on_state(False)
                log.warning("db_disconnected", error=first_line(exc))


async def _ping(conn: psycopg.AsyncConnection[Any], deadline: float) -> list[psycopg.Notify]:
    """Prove the session answers within `deadline`; returns the notifications
    read along with the answer.

    Sent on libpq directly, like `_read`: psycopg, when a wait is cancelled,
    sends the server a cancel request and waits for that too, on the very
    network that has stalled. Unanswered, the session is given up (closed,
    nothing more sent) and the listener reconnects.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    pgconn = conn.pgconn
    pgconn.send_query(session.ping_bytes())
    while pgconn.flush() != 0:  # the kernel's buffer is full: the network stalls
        if loop.time() >= give_up:
            raise _unanswered(deadline)
        await asyncio.sleep(0.05)
    while True:
        if not await _readable(conn, max(0.0, give_up - loop.time())):
            raise _unanswered(deadline)
        pgconn.consume_input()
        if not pgconn.is_busy():
            break
    while (result := pgconn.get_result()) is not None:
        if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
            raise psycopg.OperationalError(
                (result.error_message or b"ping failed").decode(errors="replace").strip()
            )
    return _read(conn)


def _unanswered(deadline: float) -> psycopg.OperationalError:
    return psycopg.OperationalError(f"the database did not answer a ping within {deadline:g} s")


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


def _read(conn: psycopg.AsyncConnection[Any]) -> list[psycopg.Notify]:
    """The notifications the socket holds, read at once.

    psycopg's notifies() would register the socket with the loop again and
    wait a turn for what `_readable` has just seen is there: a loop turn
    between PostgreSQL's delivery and the trigger's call. Nothing else reads
    this session while the listener waits, so reading it directly is safe.
    """
    pgconn = conn.pgconn
    pgconn.consume_input()  # a lost connection raises OperationalError
    encoding = conn.info.encoding
    found = []
    while (raw := pgconn.notifies()) is not None:
        found.append(
            psycopg.Notify(raw.relname.decode(encoding), raw.extra.decode(encoding), raw.be_pid)
        )
    return found


Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class Listener:
    """The listening service: the LISTEN session, or the poll standing in."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        wake_channel: str,
        *,
        log: FilteringBoundLogger,
        connect: Connect,
        on_connect: OnConnect,
        on_notify: OnNotify,
        on_state: OnState,
        on_poll: Callable[[], None],
        extra_channels: Sequence[str] = (),
    ) -> None:
        """`extra_channels`: listened to on the same session, for what the
        worker serves beyond its own work (the HTTP event stream)."""
        self._settings = settings
        self._wake_channel = wake_channel
        self._extra_channels = tuple(extra_channels)
        self._log = log
        self._connect = connect
        self._on_connect = on_connect
        self._on_notify = on_notify
        self._on_state = on_state
        self._on_poll = on_poll

    async def run(self) -> None:
        settings = self._settings()
        if not settings.listen:
            await self._poll()
            return
        await listen_forever(
            settings.listen_conninfo,
            [settings.channel, self._wake_channel, *self._extra_channels],
            log=self._log,
            on_connect=self._on_connect,
            on_notify=self._on_notify,
            on_state=self._on_state,
            ping_every=max(settings.heartbeat_interval, 1.0) * 3,
            ping_deadline=max(settings.heartbeat_interval, 1.0) * 2,
        )

    async def _poll(self) -> None:
        """`listen = false`: no session to LISTEN on (README, "Production
        databases"). Every poll_interval the database is asked whether it is
        there, and the executor looks for pending runs; NOTIFYs are not
        heard, trigger() calls and cron fires are. Without a session, no
        liveness lock is held: peers judge this worker by its heartbeat."""
        up: bool | None = None
        while True:
            try:
                async with self._connect() as conn:
                    await session.ping(conn)
                now_up = True
            except TRANSIENT as exc:
                now_up = False
                if up is not False:
                    self._log.warning("db_disconnected", error=first_line(exc))
            if now_up != up:
                if now_up and up is False:
                    self._log.info("db_reconnected")
                self._on_state(now_up)
                up = now_up
            self._on_poll()
            # poll mode: polling is the point
            await asyncio.sleep(self._settings().poll_interval)
