"""Does a NOTIFY come back on the listening session? Asked once at start.

Through a transaction-mode pooler (PgBouncer's default on most managed
offerings) LISTEN runs on whichever server connection the pooler lends for
that one statement, and no notification ever reaches the client: a worker
would start, look healthy, and never hear a trigger. So before serving, the
worker LISTENs on a channel of its own on the listening URL, NOTIFYs it on
the same session, and waits for the notification to come back.
"""

from __future__ import annotations

import secrets
from typing import Any

import psycopg

from syncworker.db import session

# A direct session delivers its own notification with the NOTIFY's result:
# a second is generous even on a slow link.
PROBE_DEADLINE = 5.0


async def notifications_arrive(conninfo: str, kwargs: dict[str, Any]) -> bool:
    """True if a NOTIFY that another session of `conninfo` sends reaches a
    session LISTENing there, as triggers must.

    From another session, not the same one: a transaction pooler may lend
    the LISTENing server connection to the sender too (one client, one idle
    server connection), and hand the notification back to it.
    """
    channel = f"syncworker_probe_{secrets.token_hex(6)}"
    async with (
        await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **kwargs) as listener,
        await psycopg.AsyncConnection.connect(conninfo, autocommit=True, **kwargs) as sender,
    ):
        await session.listen(listener, channel)
        await session.notify_probe(sender, channel)
        async for _ in listener.notifies(timeout=PROBE_DEADLINE, stop_after=1):
            return True
        return False
