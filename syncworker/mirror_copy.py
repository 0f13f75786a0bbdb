"""COPY one batch of a mirror into its staging table.

Binary COPY is several times cheaper than text on both ends (no text
formatting of datetimes and floats in Python, no parsing on the server), but
it sends each value in its column type's exact wire format, so it is only
safe when every value's Python type has that format: a str for a timestamptz
column, or an int too big for an int4 (which psycopg's binary dumper would
silently wrap), must go as text and be parsed by the server. So each batch is
checked column by column, in C-level passes, and goes binary only when all
of it fits; otherwise as text, which accepts anything PostgreSQL can parse.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from functools import partial
from operator import attrgetter, is_not, itemgetter
from typing import Any

import psycopg
from psycopg.types.json import Json, Jsonb

from syncworker import mirror_sql as q
from syncworker.mirror_sql import Column, MirrorError

_present = partial(filter, partial(is_not, None))


@dataclass(frozen=True)
class _Binary:
    dumper: str  # the type name psycopg picks the binary dumper by
    types: frozenset[type]
    fits: Callable[[list[Any]], bool] | None = None  # a further check of the non-NULL values


def _within(low: int, high: int) -> Callable[[list[Any]], bool]:
    return lambda values: not values or (min(values) >= low and max(values) <= high)


def _aware(values: list[Any]) -> bool:
    return None not in set(map(attrgetter("tzinfo"), values))


def _naive(values: list[Any]) -> bool:
    return set(map(attrgetter("tzinfo"), values)) <= {None}


_TEXT = _Binary("text", frozenset({str}))
_JSON = frozenset({Json, Jsonb})
_BINARY = {
    "smallint": _Binary("int2", frozenset({int}), _within(-(2**15), 2**15 - 1)),
    "integer": _Binary("int4", frozenset({int}), _within(-(2**31), 2**31 - 1)),
    "bigint": _Binary("int8", frozenset({int}), _within(-(2**63), 2**63 - 1)),
    "real": _Binary("float4", frozenset({float, int})),
    "double precision": _Binary("float8", frozenset({float, int})),
    "numeric": _Binary("numeric", frozenset({Decimal, int})),
    "text": _TEXT,
    "character varying": _TEXT,
    "character": _TEXT,
    "boolean": _Binary("bool", frozenset({bool})),
    "timestamp with time zone": _Binary("timestamptz", frozenset({datetime}), _aware),
    "timestamp without time zone": _Binary("timestamp", frozenset({datetime}), _naive),
    "date": _Binary("date", frozenset({date})),
    "uuid": _Binary("uuid", frozenset({uuid.UUID})),
    "json": _Binary("json", _JSON),
    "jsonb": _Binary("jsonb", _JSON),
    "bytea": _Binary("bytea", frozenset({bytes})),
}


def binary_types(columns: Sequence[Column], rows: list[tuple[Any, ...]]) -> list[str] | None:
    """The types to COPY `rows` in binary with, or None when some value has
    no exact binary form for its column."""
    dumpers = []
    for i, column in enumerate(columns):
        rule = _BINARY.get(column.base)
        if rule is None:
            return None
        values = list(_present(map(itemgetter(i), rows)))
        if not set(map(type, values)) <= rule.types:
            return None
        if rule.fits is not None and not rule.fits(values):
            return None
        dumpers.append(rule.dumper)
    return dumpers


async def copy_rows(
    conn: psycopg.AsyncConnection[Any],
    label: str,
    columns: Sequence[Column],
    rows: list[tuple[Any, ...]],
    start: int,
) -> None:
    """COPY `rows` (the source rows from index `start` on) into the stage;
    a value that does not fit raises MirrorError naming its row."""
    types = binary_types(columns, rows)
    statement = q.copy_stage([c.name for c in columns], binary=types is not None)
    index = 0
    try:
        async with conn.cursor() as cur, cur.copy(statement) as copy:
            if types is not None:
                copy.set_types(types)
            for index, row in enumerate(rows):  # noqa: B007 - read in the handler
                await copy.write_row(row)
    except (psycopg.DataError, psycopg.ProgrammingError) as exc:
        if exc.sqlstate is None:  # raised on our side, e.g. a value psycopg cannot adapt
            raise MirrorError(f"{label}: row {start + index}: {exc}") from exc
        if not isinstance(exc, psycopg.DataError):
            raise
        line = _copy_line(exc)
        where = f"row {start + line - 1}" if line else f"rows {start}..{start + len(rows) - 1}"
        raise MirrorError(f"{label}: {where}: {exc.diag.message_primary or exc}") from exc


def _copy_line(exc: psycopg.Error) -> int | None:
    """The 1-based line of COPY's error context: 'COPY t, line 5, column c: ...'."""
    context = exc.diag.context or ""
    marker = ", line "
    if marker not in context:
        return None
    digits = context.split(marker, 1)[1].split(",", 1)[0].split(":", 1)[0].strip()
    return int(digits) if digits.isdigit() else None
