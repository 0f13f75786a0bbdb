"""db/sql/schema/ is the schema the migrations build, object for object.

One schema is built from the files of db/sql/schema/, another by migrate()
from db/sql/migrations/, in one test database; their catalogs are compared:
functions (pg_get_functiondef), columns, indexes, constraints, triggers,
views, reloptions and every ACL. Each side's own names (its schema, its wake
channel, its lock namespace) are written as the files' placeholders first.
When this fails, the schema file and the newest migration disagree: change
a function in schema/ and copy it into a new migration
(`python -m syncworker.db.new_migration NAME`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from syncworker.db import Store, lock_namespace
from syncworker.db.schema import migrations, render, schema_files

FROM_SCHEMA = "sw_from_schema"
FROM_MIGRATIONS = "sw_from_migrations"

# Migrations are history: an install that applied one never sees it again,
# so a changed file would leave installs apart. Their hashes as released.
MIGRATION_SHA256 = {
    "001_init.sql": "f6231825c6411ff2699dfe2ec1b38d2bcb6e749b2977e0c7a68f3bd7ad1c4c4e",
    "002_trigger_execute_not_public.sql": "fa9737bb6fe17c3de7d526c3dd46e8b71ea08491ed189748bea7403a5329865a",
    "003_cron_fires_by_worker_only.sql": "e9daf743a436fd04c9da32235902387e0a080c70c8697358a6362b928ad7840a",
    "004_claim_in_id_order.sql": "8371270e81b9cf0a15c3c15a49215c66f5146ff3f3b167a2ef46aa8d0c0f3eb3",
    "005_reserve_for_an_idle_worker.sql": "c825e70bf14779e7e28630e55e1b9cb07ce9be6888c547c267e20724942eacae",
    "006_fewer_writes_per_trigger.sql": "e40c17980268dd2ee0c2970002dafdd4bb6551d9fb0ec2f9b7cf78ce42a4fbff",
    "007_least_privilege.sql": "520f6d311e2ff6ff7b34c050e9f0a5e6fec03b8fbf259267499c5e377190611e",
    "008_payload_size_limit.sql": "126c25df07bc0d77637e9671fde02429af8703e900eba239f6565cbfc44d8bc7",
    "009_judged_by_own_lease.sql": "2c250ef0e3fa1e88138a8325168ad5c23f3d22bcb537247017d2f36bf180759e",
    "010_pause_and_resume.sql": "0b80eef0637d3188e606011fac8e31ec36a591dd5a8e0542ae74e8c0d35659d3",
    "011_cancel.sql": "a09ebf6b2b0aace8600156e5d6c25c49359f06a876fd3d7914caaf53362f2a4b",
    "012_delayed_triggers.sql": "1a6e1ceb92a2c978b5b2aaf43ad8d72b180a39513439e366dff553288f64bb3f",
    "013_backfill.sql": "9065f322366b475b77aba029f77942c3e93c76e7bec85a09fdf3230e0c678e31",
    "014_payloads_reserved_too.sql": "c826e4cd8d483c23ad1362b2e14dc1327152ff6aaf9c39eb40801883c1bce53c",
}

# ACLs as (grantee, privilege, grantable), a NULL ACL as the default it stands
# for: an explicit owner-only ACL and the default are the same rights.
_ACL = """
coalesce((SELECT array_agg(
            (CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END)
            || ':' || a.privilege_type || CASE WHEN a.is_grantable THEN '*' ELSE '' END
            ORDER BY 1)
          FROM aclexplode(coalesce({acl}, acldefault({kind}, {owner}))) a), '{{}}')
"""

CATALOG = {
    "relations": """
        SELECT c.relname, c.relkind, c.reloptions, """
    + _ACL.format(
        acl="c.relacl",
        kind="CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::\"char\"",
        owner="c.relowner",
    )
    + """
        FROM pg_class c WHERE c.relnamespace = %(ns)s AND c.relkind IN ('r', 'v', 'S', 'm', 'p')
        ORDER BY c.relname""",
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
               pg_get_expr(d.adbin, d.adrelid), a.attnotnull, a.attidentity, a.attgenerated,
               a.attacl::text[]
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = %(ns)s AND c.relkind IN ('r', 'v', 'p')
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY c.relname, a.attnum""",
    "indexes": """
        SELECT i.relname, pg_get_indexdef(i.oid)
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        WHERE i.relnamespace = %(ns)s ORDER BY i.relname""",
    "constraints": """
        SELECT c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid)
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        WHERE k.connamespace = %(ns)s ORDER BY c.relname, k.conname""",
    "triggers": """
        SELECT t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE c.relnamespace = %(ns)s AND NOT t.tgisinternal ORDER BY t.tgname""",
    "views": """
        SELECT c.relname, pg_get_viewdef(c.oid)
        FROM pg_class c WHERE c.relnamespace = %(ns)s AND c.relkind IN ('v', 'm')
        ORDER BY c.relname""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid), """
    + _ACL.format(acl="p.proacl", kind="'f'::\"char\"", owner="p.proowner")
    + """
        FROM pg_proc p WHERE p.pronamespace = %(ns)s ORDER BY p.proname, 2""",
    "schema": "SELECT n.nspacl::text[] FROM pg_namespace n WHERE n.oid = %(ns)s",
}


def catalog(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """What the comparison sees of `schema`, its own names as placeholders."""
    row = conn.execute("SELECT %s::regnamespace::oid", (schema,)).fetchone()
    assert row is not None
    ns = str(lock_namespace(schema))

    def normal(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(schema, "__SCHEMA__").replace(ns, "__LOCK_NS__")
        if isinstance(value, list):
            return [normal(v) for v in value]
        return value

    return {
        kind: [tuple(normal(v) for v in r) for r in conn.execute(text.encode(), {"ns": row[0]})]
        for kind, text in CATALOG.items()
    }


def build_from_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    for _name, text in schema_files():
        conn.execute(render(text, conn, schema))


def build_from_migrations(url: str, schema: str) -> None:
    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await Store(schema, "sync_events").migrate(conn)

    asyncio.run(go())


def differences(ours: dict[str, list[Any]], theirs: dict[str, list[Any]]) -> list[str]:
    out = []
    for kind in CATALOG:
        only_schema = [r for r in ours[kind] if r not in theirs[kind]]
        only_migrations = [r for r in theirs[kind] if r not in ours[kind]]
        out += [f"{kind}, schema/ only: {r}" for r in only_schema]
        out += [f"{kind}, migrations only: {r}" for r in only_migrations]
    return out


@pytest.fixture
def both(database_url: str) -> Callable[[], list[str]]:
    """Builds both schemas; the call compares them as they are then."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        build_from_schema(conn, FROM_SCHEMA)
    build_from_migrations(database_url, FROM_MIGRATIONS)

    def compare() -> list[str]:
        with psycopg.connect(database_url, autocommit=True) as conn:
            return differences(catalog(conn, FROM_SCHEMA), catalog(conn, FROM_MIGRATIONS))

    return compare


def test_the_schema_files_build_what_the_migrations_build(both: Callable[[], list[str]]) -> None:
    assert both() == []


DRIFTS = {
    "function body": "CREATE OR REPLACE FUNCTION {s}.claimable(jobs text[]) RETURNS SETOF bigint"
    " LANGUAGE sql ROWS 1 SET enable_sort = off SET search_path = pg_catalog, pg_temp"
    " AS $fn$ SELECT 1::bigint $fn$",
    "column default": "ALTER TABLE {s}.jobs ALTER COLUMN timezone SET DEFAULT 'Europe/Paris'",
    "nullability": "ALTER TABLE {s}.runs ALTER COLUMN source DROP NOT NULL",
    "index": "CREATE INDEX runs_extra ON {s}.runs (requested_at)",
    "constraint": "ALTER TABLE {s}.jobs ADD CHECK (timeout > 0)",
    "trigger": "DROP TRIGGER runs_payload_size_limit ON {s}.runs",
    "view": "CREATE OR REPLACE VIEW {s}.run_payloads WITH (security_barrier) AS"
    " SELECT r.id AS run_id, r.job, r.scope, r.payload FROM {s}.runs r",
    "function grant": "GRANT EXECUTE ON FUNCTION {s}.claimable(text[]) TO PUBLIC",
    "table grant": "GRANT SELECT ON {s}.workers TO PUBLIC",
    "column grant": "GRANT SELECT (id) ON {s}.runs TO PUBLIC",
}


@pytest.mark.parametrize("side", [FROM_SCHEMA, FROM_MIGRATIONS])
@pytest.mark.parametrize("change", DRIFTS.values(), ids=DRIFTS.keys())
def test_a_drift_on_either_side_is_seen(
    both: Callable[[], list[str]], database_url: str, side: str, change: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL(change).format(s=sql.Identifier(side)))
    assert both() != []


def test_the_migrations_are_as_released() -> None:
    # Byte for byte: what the files were when they moved from syncworker/sql/.
    names = {f"{v:03d}": v for v, _ in migrations()}
    assert len(names) == len(MIGRATION_SHA256)
    from importlib import resources

    folder = resources.files("syncworker.db").joinpath("sql", "migrations")
    for name, digest in MIGRATION_SHA256.items():
        data = folder.joinpath(name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name
