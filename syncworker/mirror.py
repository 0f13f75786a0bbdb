"""Mirror a source into a table: insert what is new, update what changed,
optionally delete what the source no longer has, and count each.

One call is one transaction (a savepoint when the connection is already in
one): a source that fails half-way, or a bad row in the last batch, leaves
the table as it was. Rows are read in batches of `batch_size`; each batch
goes into a temporary table by COPY and is merged with one INSERT ... ON
CONFLICT, so memory does not grow with the source. The keys seen so far live in a second
temporary table, whose primary key also rejects a duplicate or NULL key.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Json, Jsonb

from syncworker import mirror_sql as q
from syncworker.mirror_copy import copy_rows
from syncworker.mirror_sql import MirrorError, Table, changes_table_ddl

__all__ = ["DEFAULT_BATCH_SIZE", "MirrorError", "MirrorResult", "changes_table_ddl", "mirror"]

DEFAULT_BATCH_SIZE = 5000

Row = Mapping[str, Any]
Rows = Iterable[Row] | AsyncIterable[Row]


@dataclass(frozen=True)
class MirrorResult:
    """What one mirror call did. `unchanged` rows matched the table already."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0

    @property
    def processed(self) -> int:
        return self.inserted + self.updated + self.unchanged + self.deleted


async def mirror(
    conn: psycopg.AsyncConnection[Any],
    table: str | Sequence[str],
    rows: Rows,
    *,
    key: Sequence[str],
    scope: str | None = None,
    scope_column: str | None = None,
    delete_missing: bool = False,
    changes_table: str | Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    run_id: int | None = None,
) -> MirrorResult:
    """Make `table` hold `rows` (see SyncContext.mirror, which passes the
    run's scope and id); raises MirrorError, leaving the table as it was,
    when the rows do not fit it."""
    key = _key_list(key)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MirrorError(f"batch_size must be a positive integer, not {batch_size!r}")
    if isinstance(rows, Mapping | str | bytes):
        raise MirrorError("rows must be an iterable of dicts (one dict per row)")
    if scope_column is not None and scope is None:
        raise MirrorError(f"scope_column={scope_column!r} needs a scope; this run has none")
    target = await q.describe(conn, table)
    _check_key(target, key, scope_column)
    changes = None
    if changes_table is not None:
        changes = await q.describe(conn, changes_table)
        q.check_changes_table(changes)
    params = {"run_id": run_id, "table_name": target.label, "scope": scope}

    inserted = updated = unchanged = deleted = 0
    async with conn.transaction():
        for statement in q.create_seen(target, key):
            await conn.execute(statement)
        plan: _Plan | None = None
        start = 0
        async with aclosing(_batches(rows, batch_size)) as batches:
            async for batch in batches:
                if plan is None:  # the first row fixes the columns
                    plan = _plan(target, batch[0], key, scope_column, scope, changes)
                    await conn.execute(q.create_stage(target, plan.shape.columns))
                else:
                    await conn.execute(q.truncate_stage())
                new, changed = await plan.merge(conn, batch, start, params)
                inserted += new
                updated += changed
                unchanged += len(batch) - new - changed
                start += len(batch)
        if delete_missing:
            cur = await conn.execute(q.delete_missing(target, key, scope_column, changes), params)
            gone = await cur.fetchone()
            deleted = gone[0] if gone else 0
        await conn.execute(q.drop_temp())
    return MirrorResult(inserted=inserted, updated=updated, unchanged=unchanged, deleted=deleted)


@dataclass(frozen=True)
class _Plan:
    """One mirror call's per-batch work, fixed once the first row is known."""

    target: Table
    key: list[str]
    scope_column: str | None
    scope: str | None
    shape: _Shape
    upsert: sql.Composed

    async def merge(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: list[Row],
        start: int,
        params: Mapping[str, Any],
    ) -> tuple[int, int]:
        """Stage `batch` (source rows from index `start`) and merge it into
        the target: (inserted, updated)."""
        staged = [self.target.columns[c] for c in self.shape.columns]
        rows = self.shape.tuples(batch, start)
        await copy_rows(conn, self.target.label, staged, rows, start)
        await _remember(conn, self.target, self.key, batch, start)
        if self.scope_column is not None and self.scope_column not in self.key:
            await _check_other_scopes(conn, self.target, self.key, self.scope_column, self.scope)
        cur = await conn.execute(self.upsert, params)
        counts = await cur.fetchone()
        assert counts is not None
        return int(counts[0]), int(counts[1])


def _plan(
    target: Table,
    first: Row,
    key: list[str],
    scope_column: str | None,
    scope: str | None,
    changes: Table | None,
) -> _Plan:
    shape = _shape(target, first, key, scope_column, scope)
    return _Plan(
        target=target,
        key=key,
        scope_column=scope_column,
        scope=scope,
        shape=shape,
        upsert=q.upsert(target, shape.columns, key, scope_column, changes),
    )


def _key_list(key: Sequence[str]) -> list[str]:
    if isinstance(key, str):
        key = [key]
    if not key or not all(isinstance(k, str) and k for k in key) or len(set(key)) != len(key):
        raise MirrorError(f"key must be a non-empty list of distinct column names, not {key!r}")
    return list(key)


def _check_key(target: Table, key: list[str], scope_column: str | None) -> None:
    wanted = [*key, scope_column] if scope_column else key
    unknown = [c for c in wanted if c not in target.columns]
    if unknown:
        raise MirrorError(
            f"table {target.label} has no column(s) {_quoted(unknown)}"
            f" (its columns: {_quoted(target.columns)})"
        )
    if not any(set(unique) == set(key) for unique in target.unique_keys):
        found = "; ".join(f"({', '.join(u)})" for u in target.unique_keys) or "none"
        raise MirrorError(
            f"key ({', '.join(key)}) of table {target.label} is not covered by a unique"
            " index or constraint on exactly those columns, which ON CONFLICT needs"
            f" (unique keys: {found}); add one, e.g. ALTER TABLE ... ADD UNIQUE ({', '.join(key)})"
        )


@dataclass(frozen=True)
class _Shape:
    """How the source's dicts become COPY rows, fixed by the first row."""

    keys: tuple[str, ...]  # the keys every row must have, in the first row's order
    columns: tuple[str, ...]  # the COPY columns: the keys, plus the scope column if added
    getter: Callable[[Row], tuple[Any, ...]]
    json_positions: tuple[int, ...]
    scope: str | None
    scope_position: int | None  # the scope column among the keys, when rows carry it
    add_scope: bool

    def tuples(self, batch: list[Row], start: int) -> list[tuple[Any, ...]]:
        # The common case stays in C (map, itemgetter); the slow scan below
        # only runs to name the offending row.
        try:
            values = list(map(self.getter, batch))
            fits = set(map(len, batch)) == {len(self.keys)}
        except (KeyError, TypeError):
            fits = False
        if not fits:
            _raise_bad_row(self.keys, batch, start)
        if self.scope_position is not None:
            _check_scopes(values, self.scope_position, self.scope, start)
        if self.add_scope:
            scope = (self.scope,)
            values = [v + scope for v in values]
        if self.json_positions:
            values = [_as_json(v, self.json_positions) for v in values]
        return values


def _shape(
    target: Table, first: Row, key: list[str], scope_column: str | None, scope: str | None
) -> _Shape:
    if not isinstance(first, Mapping):
        raise MirrorError(f"row 0 is a {type(first).__name__}, not a dict")
    keys = tuple(first)
    unknown = [c for c in keys if c not in target.columns]
    if unknown:
        raise MirrorError(
            f"table {target.label} has no column(s) {_quoted(unknown)} (keys of row 0;"
            f" its columns: {_quoted(target.columns)})"
        )
    generated = [c for c in keys if target.columns[c].generated]
    if generated:
        raise MirrorError(
            f"column(s) {_quoted(generated)} of {target.label} are generated; leave them out"
        )
    add_scope = scope_column is not None and scope_column not in keys
    columns = (*keys, scope_column) if add_scope and scope_column else keys
    missing = [k for k in key if k not in columns]
    if missing:
        raise MirrorError(f"the rows lack key column(s) {_quoted(missing)} (keys of row 0)")
    getter: Callable[[Row], tuple[Any, ...]]
    if len(keys) == 1:
        only = keys[0]
        getter = lambda row: (row[only],)  # noqa: E731 - itemgetter of one name gives no tuple
    else:
        getter = itemgetter(*keys)
    return _Shape(
        keys=keys,
        columns=columns,
        getter=getter,
        json_positions=tuple(i for i, c in enumerate(columns) if target.columns[c].json),
        scope=scope,
        scope_position=keys.index(scope_column) if scope_column in keys else None,
        add_scope=add_scope,
    )


def _raise_bad_row(keys: tuple[str, ...], batch: list[Row], start: int) -> None:
    expected = set(keys)
    for i, row in enumerate(batch):
        if not isinstance(row, Mapping):
            raise MirrorError(f"row {start + i} is a {type(row).__name__}, not a dict")
        if set(row) != expected:
            missing = [k for k in keys if k not in row]
            extra = [k for k in row if k not in expected]
            raise MirrorError(
                f"row {start + i} has keys {_quoted(row)} but row 0 has {_quoted(keys)}"
                f" (missing: {_quoted(missing) or '-'}; unexpected: {_quoted(extra) or '-'});"
                " all rows must have the same keys"
            )


def _check_scopes(
    values: list[tuple[Any, ...]], position: int, scope: str | None, start: int
) -> None:
    for i, value in enumerate(map(itemgetter(position), values)):
        if value != scope and str(value) != scope:
            raise MirrorError(
                f"row {start + i} belongs to scope {value!r}, not to this run's scope {scope!r}"
            )


def _as_json(values: tuple[Any, ...], positions: tuple[int, ...]) -> tuple[Any, ...]:
    row = list(values)
    for i in positions:
        value = row[i]
        if value is not None and not isinstance(value, Json | Jsonb):
            row[i] = Jsonb(value)
    return tuple(row)


async def _batches(rows: Rows, size: int) -> AsyncGenerator[list[Row], None]:
    if not isinstance(rows, AsyncIterable):
        source = iter(rows)
        while batch := list(islice(source, size)):
            yield batch
        return
    stream = aiter(rows)
    try:
        batch = []
        async for row in stream:
            batch.append(row)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        # An HTTP pager left half-read should let go of its connection now.
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def _remember(
    conn: psycopg.AsyncConnection[Any], target: Table, key: list[str], batch: list[Row], start: int
) -> None:
    try:
        await conn.execute(q.remember_keys(key))
    except psycopg.errors.UniqueViolation as exc:
        detail = (exc.diag.message_detail or "").removeprefix("Key ")
        detail = detail.removesuffix(" already exists.")
        raise MirrorError(
            f"{target.label}: key {detail} appears more than once in the rows;"
            " each key may appear once"
        ) from exc
    except psycopg.errors.NotNullViolation as exc:
        column = exc.diag.column_name or "?"
        index = next((i for i, row in enumerate(batch) if row.get(column) is None), None)
        where = f"row {start + index}" if index is not None else "a row"
        raise MirrorError(
            f"{target.label}: {where} has no value for key column {column!r}"
        ) from exc


async def _check_other_scopes(
    conn: psycopg.AsyncConnection[Any],
    target: Table,
    key: list[str],
    scope_column: str,
    scope: str | None,
) -> None:
    cur = await conn.execute(q.other_scope_row(target, key, scope_column))
    clash = await cur.fetchone()
    if clash is not None:
        raise MirrorError(
            f"{target.label}: key {clash[0]} already belongs to scope {clash[1]!r}; a mirror"
            f" of scope {scope!r} leaves other scopes' rows alone"
        )


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)
