"""What `mirror` needs from the catalog, and the statements it runs.

Every identifier goes through psycopg.sql; values are always parameters.

The one place outside syncworker/db/ that holds SQL, on purpose: these
statements are built per user table, from its columns and key as the
catalog reports them, so there is no fixed text to name in
db/sql/queries/. tests/test_security.py lists this module as the exception.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

STAGE = sql.Identifier("pg_temp", "syncworker_mirror_stage")
SEEN = sql.Identifier("pg_temp", "syncworker_mirror_seen")

# The columns `mirror` writes into a changes table, with the types it expects.
CHANGES_COLUMNS = {
    "run_id": "bigint",
    "table_name": "text",
    "scope": "text",
    "kind": "text",
    "key": "jsonb",
    "old": "jsonb",
    "new": "jsonb",
    "changed_at": "timestamp with time zone",
}


class MirrorError(ValueError):
    """The rows or the arguments of a mirror do not fit the target table."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    base: str  # the type under any domain, without modifiers
    comparable: bool  # has an equality operator of its own; else compared as text
    generated: bool

    @property
    def json(self) -> bool:
        """Values are Python objects to be sent as JSON."""
        return self.base in ("json", "jsonb")


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    columns: dict[str, Column]
    unique_keys: list[tuple[str, ...]]  # non-partial, immediate unique indexes

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}"


def split_name(table: str | Sequence[str]) -> tuple[str, ...]:
    """`"app.users"` or `("app", "users")`; names are taken literally (case kept)."""
    parts = tuple(table.split(".", 1)) if isinstance(table, str) else tuple(table)
    if not 1 <= len(parts) <= 2 or not all(isinstance(p, str) and p for p in parts):
        raise MirrorError(f"table name {table!r}: expected 'table' or 'schema.table'")
    return parts


_DESCRIBE = """
SELECT n.nspname, c.relname, c.relkind,
  (SELECT coalesce(json_agg(json_build_object(
      'name', a.attname,
      'type', format_type(a.atttypid, a.atttypmod),
      'base', format_type(coalesce(nullif(t.typbasetype, 0), a.atttypid), NULL),
      'comparable', EXISTS (SELECT 1 FROM pg_operator o WHERE o.oprname = '='
                            AND o.oprleft = a.atttypid AND o.oprright = a.atttypid),
      'generated', a.attgenerated <> '') ORDER BY a.attnum), '[]')
   FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
   WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
  (SELECT coalesce(json_agg(cols), '[]') FROM (
     SELECT array_agg(a.attname ORDER BY k.ord) AS cols
     FROM pg_index i
     CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = c.oid AND i.indisunique AND i.indimmediate AND i.indisvalid
       AND i.indpred IS NULL AND i.indexprs IS NULL AND k.ord <= i.indnkeyatts
     GROUP BY i.indexrelid) u)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%s)
"""


async def describe(conn: psycopg.AsyncConnection[Any], table: str | Sequence[str]) -> Table:
    """The table's columns and unique keys, read from the catalog."""
    parts = split_name(table)
    cur = await conn.execute(_DESCRIBE, (sql.Identifier(*parts).as_string(conn),))
    row = await cur.fetchone()
    if row is None:
        raise MirrorError(f"table {'.'.join(parts)} does not exist (or is not visible)")
    schema, name, kind, columns, uniques = row
    if kind not in ("r", "p"):
        raise MirrorError(f"{schema}.{name} is not a table (relkind {kind!r})")
    return Table(
        schema=schema,
        name=name,
        columns={c["name"]: Column(**c) for c in columns},
        unique_keys=[tuple(u) for u in uniques],
    )


def names(columns: Iterable[str], prefix: str | None = None) -> sql.Composable:
    """`a, "B c"`, or `p.a, p."B c"` with a prefix."""
    if prefix is None:
        return sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    return sql.SQL(", ").join(sql.Identifier(prefix, c) for c in columns)


def _key_json(key: Sequence[str], alias: str) -> sql.Composable:
    pairs = (sql.SQL("{}, {}").format(sql.Literal(k), sql.Identifier(alias, k)) for k in key)
    return sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(pairs))


def _key_match(key: Sequence[str], left: str, right: str) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(left, k), sql.Identifier(right, k)) for k in key
    )


def create_seen(table: Table, key: Sequence[str]) -> list[sql.Composed]:
    """A temporary table of the keys seen so far: its primary key rejects a
    duplicate or NULL key in the source, and it drives delete_missing without
    holding the keys in Python."""
    return [
        sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
            SEEN, names(key), table.ident
        ),
        sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(SEEN, names(key)),
    ]


def create_stage(table: Table, columns: Sequence[str]) -> sql.Composed:
    """The batch's landing table: the target's column types, no constraints,
    so a bad value is reported by COPY with its line."""
    return sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
        STAGE, names(columns), table.ident
    )


def drop_temp() -> sql.Composed:
    return sql.SQL("DROP TABLE IF EXISTS {}, {}").format(STAGE, SEEN)


def truncate_stage() -> sql.Composed:
    return sql.SQL("TRUNCATE {}").format(STAGE)


def copy_stage(columns: Sequence[str], binary: bool) -> sql.Composed:
    if binary:
        return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(STAGE, names(columns))
    return sql.SQL("COPY {} ({}) FROM STDIN").format(STAGE, names(columns))


def remember_keys(key: Sequence[str]) -> sql.Composed:
    return sql.SQL("INSERT INTO {} SELECT {} FROM {}").format(SEEN, names(key), STAGE)


def other_scope_row(table: Table, key: Sequence[str], scope_column: str) -> sql.Composed:
    """A staged key that already exists in the target under another scope."""
    return sql.SQL(
        "SELECT {key}::text, t.{scope}::text FROM {stage} s JOIN {target} t ON {match}"
        " WHERE t.{scope} IS DISTINCT FROM s.{scope} LIMIT 1"
    ).format(
        key=_key_json(key, "s"),
        scope=sql.Identifier(scope_column),
        stage=STAGE,
        target=table.ident,
        match=_key_match(key, "t", "s"),
    )


def _compared(table: Table, column: str, alias: str) -> sql.Composable:
    ref = sql.Identifier(alias, column)
    return ref if table.columns[column].comparable else sql.SQL("{}::text").format(ref)


def _differs(table: Table, columns: Sequence[str], old: str, new: str) -> sql.Composed:
    return sql.SQL("ROW({}) IS DISTINCT FROM ROW({})").format(
        sql.SQL(", ").join(_compared(table, c, old) for c in columns),
        sql.SQL(", ").join(_compared(table, c, new) for c in columns),
    )


def _key_aliases(key: Sequence[str], alias: str) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(sql.Identifier(alias, k), sql.Identifier(f"sw_k{i}"))
        for i, k in enumerate(key)
    )


def upsert(
    table: Table,
    columns: Sequence[str],
    key: Sequence[str],
    scope_column: str | None,
    changes: Table | None,
) -> sql.Composed:
    """One statement per batch: insert or update from the stage and return
    (inserted, updated). A row whose values are all equal is left alone (no
    new row version, no UPDATE trigger fires) and so is neither.

    Inserted rows are told from updated ones by `xmax = 0`: a row version
    created by INSERT has no xmax, one written by ON CONFLICT DO UPDATE
    carries the upserting transaction's id. With a changes table, the
    pre-images of the rows about to change come from a CTE, which sees the
    statement's snapshot: the rows as they were before this statement."""
    update = [c for c in columns if c not in key and c != scope_column]
    action: sql.Composable = sql.SQL("DO NOTHING")
    if update:
        action = sql.SQL("DO UPDATE SET {} WHERE {}").format(
            sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(c), sql.Identifier("excluded", c))
                for c in update
            ),
            _differs(table, update, "t", "excluded"),
        )
    returning: sql.Composable = sql.SQL("(t.xmax = 0) AS sw_inserted")
    if changes is not None:
        returning = sql.SQL("{}, {}, to_jsonb(t.*) AS sw_new").format(
            returning, _key_aliases(key, "t")
        )
    ctes = [
        sql.SQL(
            "up AS (INSERT INTO {target} AS t ({cols}) SELECT {cols} FROM {stage}"
            " ON CONFLICT ({key}) {action} RETURNING {returning})"
        ).format(
            target=table.ident,
            cols=names(columns),
            stage=STAGE,
            key=names(key),
            action=action,
            returning=returning,
        )
    ]
    if changes is not None:
        ctes.append(
            sql.SQL(
                "pre AS (SELECT {aliases}, to_jsonb(t.*) AS sw_old"
                " FROM {target} t JOIN {stage} s ON {match} WHERE {differs})"
            ).format(
                aliases=_key_aliases(key, "t"),
                target=table.ident,
                stage=STAGE,
                match=_key_match(key, "t", "s"),
                differs=_differs(table, update, "t", "s") if update else sql.SQL("false"),
            )
        )
        key_json = sql.SQL("jsonb_build_object({})").format(
            sql.SQL(", ").join(
                sql.SQL("{}, up.{}").format(sql.Literal(k), sql.Identifier(f"sw_k{i}"))
                for i, k in enumerate(key)
            )
        )
        ctes.append(
            sql.SQL(
                "logged AS (INSERT INTO {changes} ({cols})"
                " SELECT %(run_id)s::bigint, %(table_name)s::text, %(scope)s::text,"
                " CASE WHEN up.sw_inserted THEN 'insert' ELSE 'update' END,"
                " {key_json}, pre.sw_old, up.sw_new, now()"
                " FROM up LEFT JOIN pre ON {match})"
            ).format(
                changes=changes.ident,
                cols=names(CHANGES_COLUMNS),
                key_json=key_json,
                match=sql.SQL(" AND ").join(
                    sql.SQL("pre.{0} = up.{0}").format(sql.Identifier(f"sw_k{i}"))
                    for i in range(len(key))
                ),
            )
        )
    return sql.SQL(
        "WITH {} SELECT count(*) FILTER (WHERE sw_inserted),"
        " count(*) FILTER (WHERE NOT sw_inserted) FROM up"
    ).format(sql.SQL(", ").join(ctes))


def delete_missing(
    table: Table, key: Sequence[str], scope_column: str | None, changes: Table | None
) -> sql.Composed:
    """Delete the target rows (of the scope) whose key the source did not have."""
    where: sql.Composable = sql.SQL("NOT EXISTS (SELECT 1 FROM {seen} s WHERE {match})").format(
        seen=SEEN, match=_key_match(key, "s", "t")
    )
    if scope_column is not None:
        where = sql.SQL("t.{} = %(scope)s AND {}").format(sql.Identifier(scope_column), where)
    returning: sql.Composable = sql.SQL("1")
    logged: sql.Composable = sql.SQL("")
    if changes is not None:
        returning = sql.SQL("{} AS sw_key, to_jsonb(t.*) AS sw_old").format(_key_json(key, "t"))
        logged = sql.SQL(
            ", logged AS (INSERT INTO {changes} ({cols})"
            " SELECT %(run_id)s::bigint, %(table_name)s::text, %(scope)s::text, 'delete',"
            " sw_key, sw_old, NULL, now()"
            " FROM gone)"
        ).format(changes=changes.ident, cols=names(CHANGES_COLUMNS))
    return sql.SQL(
        "WITH gone AS (DELETE FROM {target} t WHERE {where} RETURNING {returning}){logged}"
        " SELECT count(*) FROM gone"
    ).format(target=table.ident, where=where, returning=returning, logged=logged)


def changes_table_ddl(name: str | Sequence[str]) -> str:
    """`CREATE TABLE IF NOT EXISTS` for a change log `mirror(changes_table=...)` can write."""
    ident = sql.Identifier(*split_name(name))
    columns = sql.SQL(
        "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " run_id bigint,"
        " table_name text NOT NULL,"
        " scope text,"
        " kind text NOT NULL CHECK (kind IN ('insert', 'update', 'delete')),"
        " key jsonb NOT NULL,"
        " old jsonb,"
        " new jsonb,"
        " changed_at timestamptz NOT NULL DEFAULT now()"
    )
    return sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(ident, columns).as_string(None)


def check_changes_table(changes: Table) -> None:
    missing = [c for c in CHANGES_COLUMNS if c not in changes.columns]
    if missing:
        raise MirrorError(
            f"changes table {changes.label} lacks column(s) {', '.join(missing)};"
            " create it with syncworker.mirror.changes_table_ddl(name)"
        )
