"""Following run events: what `trigger --wait` and `status --watch` do with
the events channel (events.py has its format).

Events drive the reads, never replace them: a status change makes the
follower read the run's row, a run_progress event is shown as it is, and a
slow re-read every few seconds is the safety net for an event missed while
the connection was busy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from syncworker.db import Store, session
from syncworker.events import parse_run_event
from syncworker.progress import TERMINAL, ProgressView

# trigger --wait re-reads its runs this often in case an event was missed,
# and redraws a terminal's progress lines this often for their elapsed times.
REREAD_EVERY = 5.0
REDRAW_EVERY = 0.25
# status --watch redraws at most this often, however many events arrive.
WATCH_DEBOUNCE = 0.5


async def listen(conn: psycopg.AsyncConnection[Any], channel: str) -> None:
    """Listen on the events channel; before acting, so no event slips past."""
    await session.listen(conn, channel)


async def wait_for_runs(
    conn: psycopg.AsyncConnection[Any],
    store: Store,
    ids: list[int],
    timeout: float,
    quiet: bool,
) -> list[dict[str, Any]] | None:
    """Follow run events (on a listening `conn`) until every run ended,
    drawing progress on stderr unless `quiet`; the final rows, or None on
    timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    wanted = set(ids)
    view = None if quiet else ProgressView(sys.stderr, ids, live=sys.stderr.isatty())
    rows: dict[int, dict[str, Any] | None] = {}
    stale = set(wanted)
    reread_at = loop.time() + REREAD_EVERY
    payload = await store.may_read_payload(conn)  # the app role may not (sql/007)
    try:
        while True:
            for run_id in sorted(stale):
                rows[run_id] = row = await store.read_run(conn, run_id, payload=payload)
                if row is not None and view is not None:
                    view.row(row)
            stale.clear()
            if view is not None:
                view.refresh()
            if all(r is not None and r["status"] in TERMINAL for r in rows.values()):
                return [r for i in ids if (r := rows[i]) is not None]
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            if loop.time() >= reread_at:
                # A safety net, not the driver: re-read every run now and then
                # in case an event was missed while the connection was busy.
                stale = set(wanted)
                reread_at = loop.time() + REREAD_EVERY
                continue
            # Each pass takes one batch of notifications whole (stop_after=1
            # still yields all of a batch), since breaking out of notifies()
            # mid-batch would drop the rest. A terminal wakes up more often,
            # so the elapsed times it shows keep moving.
            wake = REDRAW_EVERY if view is not None and view.live else REREAD_EVERY
            wait = min(remaining, wake, max(reread_at - loop.time(), 0.0))
            async for notify in conn.notifies(timeout=wait, stop_after=1):
                event = parse_run_event(notify.payload)
                if event is None or event.run_id not in wanted:
                    continue  # any role may NOTIFY the channel
                if event.event == "run_progress":
                    if view is not None:
                        view.event(dataclasses.asdict(event))
                else:
                    stale.add(event.run_id)  # a status change: the row tells the rest
            if view is not None:
                view.refresh()
    finally:
        if view is not None:
            view.close()


async def watch(
    conn: psycopg.AsyncConnection[Any],
    read: Callable[[], Awaitable[dict[str, Any]]],
    show: Callable[[dict[str, Any]], None],
    interval: float,
) -> None:
    """Show `read()` now, then again at each run event (debounced) or every
    `interval` seconds, until cancelled. `conn` listens on the events channel."""
    loop = asyncio.get_running_loop()
    while True:
        # Events already here are covered by the read that follows.
        async for _ in conn.notifies(timeout=0):
            pass
        show(await read())
        shown_at = loop.time()
        woken = False
        async for _ in conn.notifies(timeout=interval, stop_after=1):
            woken = True
        if woken:
            # Debounce: a busy worker publishes many events a second,
            # and a redraw per event would only flicker.
            await asyncio.sleep(max(shown_at + WATCH_DEBOUNCE - loop.time(), 0.0))
