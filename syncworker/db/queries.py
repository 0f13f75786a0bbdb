"""The named statements of db/sql/queries/, loaded once and composed once per schema.

The files are parsed (db/sqlfile.py) the first time any schema asks, and
each schema's statements are composed with its identifier once, the first
time that schema is asked for; a Store, the metrics scrape and trigger_sync
all share the result. Nothing is rebuilt per call.

The helpers below run a statement by the kind its file declares and map its
rows by column name onto a dataclass (psycopg.rows.class_row).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from syncworker.db.sqlfile import Kind, Statement, parse

T = TypeVar("T")
Params = Mapping[str, Any]

QUERIES_PACKAGE = "syncworker.db"
QUERIES_FOLDER = ("sql", "queries")


@functools.cache
def statements() -> dict[str, Statement]:
    """Every statement of the package, by name, as the files say."""
    folder = resources.files(QUERIES_PACKAGE).joinpath(*QUERIES_FOLDER)
    files = sorted(
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )
    return parse(files)


@dataclass(frozen=True)
class Query:
    """One statement, composed for one schema."""

    name: str
    kind: Kind
    composed: sql.Composed | sql.SQL
    text: str

    def compose(self, **identifiers: str) -> sql.Composed:
        """The statement with identifiers only known at run time (a channel)."""
        names = {k: sql.Identifier(v) for k, v in identifiers.items()}
        return sql.SQL(self.text).format(**names)


class Queries:
    """Every statement, composed for one schema: `q["claim_next"]`."""

    def __init__(self, schema: str | None) -> None:
        self.schema = schema
        self._all: dict[str, Query] = {}
        for name, stmt in statements().items():
            placeholders = stmt.identifiers
            composed: sql.Composed | sql.SQL
            if placeholders == {"s"}:
                if schema is None:
                    continue  # the session's statements only (session_query)
                composed = sql.SQL(stmt.text).format(s=sql.Identifier(schema))
            else:
                # No schema in it ({channel}, or none): composed by .compose() or as is.
                composed = sql.SQL(stmt.text)
            self._all[name] = Query(name, stmt.kind, composed, stmt.text)

    def __getitem__(self, name: str) -> Query:
        return self._all[name]


@functools.cache
def for_schema(schema: str) -> Queries:
    """The statements of `schema`, composed on first use and kept."""
    return Queries(schema)


def session_query(name: str) -> Query:
    """A statement that names no schema (db/sql/queries/session.sql)."""
    return _no_schema()[name]


@functools.cache
def _no_schema() -> Queries:
    return Queries(None)


def _check(query: Query, *kinds: Kind) -> None:
    if query.kind not in kinds:
        raise TypeError(f"{query.name} is :{query.kind}, run as :{'/'.join(kinds)}")


async def one(
    conn: psycopg.AsyncConnection[Any], query: Query, params: Params | None, row: type[T]
) -> T | None:
    """Run a `:one` statement: its row as a `row`, or None."""
    _check(query, "one")
    async with conn.cursor(row_factory=class_row(row)) as cur:
        await cur.execute(query.composed, params)
        return await cur.fetchone()


async def many(
    conn: psycopg.AsyncConnection[Any], query: Query, params: Params | None, row: type[T]
) -> list[T]:
    """Run a `:many` statement: its rows as `row`s."""
    _check(query, "many")
    async with conn.cursor(row_factory=class_row(row)) as cur:
        await cur.execute(query.composed, params)
        return await cur.fetchall()


async def none(
    conn: psycopg.AsyncConnection[Any], query: Query, params: Params | None = None
) -> None:
    """Run a `:none` statement."""
    _check(query, "none")
    await conn.execute(query.composed, params)


async def rowcount(
    conn: psycopg.AsyncConnection[Any], query: Query, params: Params | None = None
) -> int:
    """Run a `:rowcount` statement: how many rows it touched."""
    _check(query, "rowcount")
    cur = await conn.execute(query.composed, params)
    return cur.rowcount
