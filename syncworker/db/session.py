"""Statements about the session, not the schema (db/sql/queries/session.sql):
LISTEN, pings, the clock, the probe, a step connection's reset."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

import psycopg

from syncworker.db import queries
from syncworker.db.queries import session_query
from syncworker.db.rows import Clock, ServerVersion


@functools.cache
def ping_bytes() -> bytes:
    """The ping as libpq takes it (the listener sends it on pgconn directly)."""
    return session_query("ping").text.encode()


async def listen(conn: psycopg.AsyncConnection[Any], channel: str) -> None:
    await conn.execute(session_query("listen").compose(channel=channel))


async def ping(conn: psycopg.AsyncConnection[Any]) -> None:
    await queries.none(conn, session_query("ping"))


async def notify_probe(conn: psycopg.AsyncConnection[Any], channel: str) -> None:
    await queries.none(conn, session_query("probe_notify"), {"channel": channel})


async def clock(conn: psycopg.AsyncConnection[Any]) -> datetime | None:
    """The database's clock_timestamp()."""
    row = await queries.one(conn, session_query("clock"), None, Clock)
    return None if row is None else row.now


async def server_version(conn: psycopg.AsyncConnection[Any]) -> str:
    row = await queries.one(conn, session_query("server_version"), None, ServerVersion)
    return str(row.version) if row else "?"


async def reset(conn: psycopg.AsyncConnection[Any]) -> None:
    """DISCARD ALL: every kind of session state a step may have left."""
    await queries.none(conn, session_query("reset_session"))
