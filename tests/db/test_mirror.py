"""ctx.mirror against a real PostgreSQL: counts, scopes, deletes, the change
log, batching, bad input, quoted identifiers, and one run through a daemon."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
import pytest
import structlog
from psycopg.types.json import Jsonb
from sw_mirrorjobs import SETUP_SQL as PEOPLE_SQL

from syncworker.context import StopRequest, SyncContext
from syncworker.counters import Counters
from syncworker.mirror import MirrorError, MirrorResult, changes_table_ddl, mirror
from syncworker.mirror_copy import binary_types
from syncworker.mirror_sql import Column
from tests.harness import execute, query, wait_until, write_config

T = TypeVar("T")

USERS_SQL = """
CREATE SCHEMA app;
CREATE TABLE app.users (
    org text NOT NULL,
    id int NOT NULL,
    name text,
    email text,
    tags jsonb,
    extra json,
    seen_at timestamptz,
    PRIMARY KEY (org, id)
);
"""


def on_conn(url: str, use: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
    async def main() -> T:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await use(conn)

    return asyncio.run(main())


def mirror_sync(url: str, table: str, rows: Any, **kwargs: Any) -> MirrorResult:
    return on_conn(url, lambda conn: mirror(conn, table, rows, **kwargs))


def users(url: str, org: str | None = None) -> list[tuple[Any, ...]]:
    where = "WHERE org = %s" if org else ""
    return query(
        url,
        f"SELECT org, id, name, email, tags FROM app.users {where} ORDER BY org, id",
        (org,) if org else None,
    )


def person(org: str, i: int, name: str | None = None, **more: Any) -> dict[str, Any]:
    return {"org": org, "id": i, "name": name or f"user {i}", "email": f"u{i}@{org}", **more}


@pytest.fixture
def url(database_url: str) -> str:
    execute(database_url, USERS_SQL + changes_table_ddl("app.changes"))
    return database_url


def test_counts_match_the_table(url):
    first = [person("A", i) for i in range(10)]
    assert mirror_sync(url, "app.users", first, key=["org", "id"]) == MirrorResult(inserted=10)

    second = [person("A", i, name="renamed" if i < 3 else None) for i in range(12)]
    result = mirror_sync(url, "app.users", second, key=["org", "id"])
    assert result == MirrorResult(inserted=2, updated=3, unchanged=7)
    assert result.processed == 12
    assert users(url) == [(r["org"], r["id"], r["name"], r["email"], None) for r in second]

    # The same source again changes nothing.
    assert mirror_sync(url, "app.users", second, key=["org", "id"]) == MirrorResult(unchanged=12)


def test_unchanged_rows_are_not_rewritten(url):
    mirror_sync(url, "app.users", [person("A", 1)], key=["org", "id"])
    [(before,)] = query(url, "SELECT xmin::text FROM app.users")
    mirror_sync(url, "app.users", [person("A", 1)], key=["org", "id"])
    assert query(url, "SELECT xmin::text FROM app.users") == [(before,)]


def test_delete_missing_over_the_whole_table(url):
    mirror_sync(url, "app.users", [person("A", i) for i in range(5)], key=["org", "id"])
    result = mirror_sync(
        url,
        "app.users",
        [person("A", 1), person("A", 3, name="x")],
        key=["org", "id"],
        delete_missing=True,
    )
    assert result == MirrorResult(updated=1, unchanged=1, deleted=3)
    assert [r[1] for r in users(url)] == [1, 3]

    # An empty source empties the table.
    assert mirror_sync(url, "app.users", [], key=["org", "id"], delete_missing=True) == (
        MirrorResult(deleted=2)
    )
    assert users(url) == []


def test_scoped_mirrors_leave_other_scopes_alone(url):
    for org in ("A", "B"):
        rows = [{"id": i, "name": f"{org}{i}", "email": None} for i in range(4)]
        result = mirror_sync(
            url, "app.users", rows, key=["org", "id"], scope=org, scope_column="org"
        )
        assert result == MirrorResult(inserted=4)
    b_before = users(url, "B")

    rows = [{"id": i, "name": "changed", "email": None} for i in (0, 2)]
    result = mirror_sync(
        url,
        "app.users",
        rows,
        key=["org", "id"],
        scope="A",
        scope_column="org",
        delete_missing=True,
    )
    assert result == MirrorResult(updated=2, deleted=2)
    assert users(url, "A") == [("A", 0, "changed", None, None), ("A", 2, "changed", None, None)]
    assert users(url, "B") == b_before

    # Rows may carry the scope column, as long as it is the run's scope.
    carried = [{"org": "B", "id": 0, "name": "B0", "email": None}]
    result = mirror_sync(
        url, "app.users", carried, key=["org", "id"], scope="B", scope_column="org"
    )
    assert result == MirrorResult(unchanged=1)


def test_rows_of_another_scope_are_refused(url):
    mirror_sync(url, "app.users", [person("A", 1)], key=["org", "id"])
    before = users(url)
    rows = [person("A", 2), person("B", 3)]
    with pytest.raises(
        MirrorError, match=r"row 1 belongs to scope 'B', not to this run's scope 'A'"
    ):
        mirror_sync(url, "app.users", rows, key=["org", "id"], scope="A", scope_column="org")
    assert users(url) == before

    with pytest.raises(MirrorError, match="needs a scope"):
        mirror_sync(url, "app.users", rows, key=["org", "id"], scope_column="org")


def test_a_scope_column_outside_the_key_never_moves_rows_between_scopes(url):
    execute(url, "CREATE TABLE items (id int PRIMARY KEY, org text NOT NULL, v text)")
    mirror_sync(url, "items", [{"id": 1, "v": "a"}], key=["id"], scope="A", scope_column="org")
    result = mirror_sync(
        url, "items", [{"id": 2, "v": "b"}], key=["id"], scope="B", scope_column="org"
    )
    assert result == MirrorResult(inserted=1)
    with pytest.raises(MirrorError, match=r"""key \{"id": 1\} already belongs to scope 'A'"""):
        mirror_sync(
            url, "items", [{"id": 1, "v": "stolen"}], key=["id"], scope="B", scope_column="org"
        )
    assert query(url, "SELECT id, org, v FROM items ORDER BY id") == [(1, "A", "a"), (2, "B", "b")]


def test_the_change_log_has_old_and_new_values(url):
    kwargs: dict[str, Any] = {
        "key": ["org", "id"],
        "scope": "A",
        "scope_column": "org",
        "delete_missing": True,
        "changes_table": "app.changes",
    }
    first = [{"id": i, "name": f"n{i}", "email": None, "tags": ["t"]} for i in range(3)]
    mirror_sync(url, "app.users", first, run_id=7, **kwargs)
    second = [
        {"id": 0, "name": "n0", "email": None, "tags": ["t"]},
        {"id": 1, "name": "new name", "email": None, "tags": {"k": [1, 2]}},
        {"id": 5, "name": "n5", "email": None, "tags": None},
    ]
    result = mirror_sync(url, "app.users", second, run_id=8, **kwargs)
    assert result == MirrorResult(inserted=1, updated=1, unchanged=1, deleted=1)

    log = query(url, "SELECT run_id, table_name, scope, kind, key, old, new FROM app.changes")
    assert sorted((r[0], r[1], r[2], r[3], r[4]["id"]) for r in log) == [
        (7, "app.users", "A", "insert", 0),
        (7, "app.users", "A", "insert", 1),
        (7, "app.users", "A", "insert", 2),
        (8, "app.users", "A", "delete", 2),
        (8, "app.users", "A", "insert", 5),
        (8, "app.users", "A", "update", 1),
    ]
    assert all(r[4] == {"org": "A", "id": r[4]["id"]} for r in log)
    by_kind = {(r[0], r[3], r[4]["id"]): (r[5], r[6]) for r in log}
    old, new = by_kind[(8, "update", 1)]
    assert (old["name"], old["tags"]) == ("n1", ["t"])
    assert (new["name"], new["tags"]) == ("new name", {"k": [1, 2]})
    assert new["org"] == "A" and set(new) == {
        "org",
        "id",
        "name",
        "email",
        "tags",
        "extra",
        "seen_at",
    }
    old, new = by_kind[(8, "insert", 5)]
    assert old is None and new["name"] == "n5"
    old, new = by_kind[(8, "delete", 2)]
    assert old["name"] == "n2" and new is None
    [(stamped,)] = query(url, "SELECT count(*) FROM app.changes WHERE changed_at IS NOT NULL")
    assert stamped == 6


def test_async_source_in_batches_smaller_than_it(url):
    closed = threading.Event()

    async def pages() -> AsyncIterator[dict[str, Any]]:
        try:
            for i in range(23):
                if i % 5 == 0:
                    await asyncio.sleep(0)  # a page boundary: yields to the loop
                yield person("A", i)
        finally:
            closed.set()

    result = mirror_sync(url, "app.users", pages(), key=["org", "id"], batch_size=4)
    assert result == MirrorResult(inserted=23)
    assert closed.is_set()
    assert [r[1] for r in users(url)] == list(range(23))

    # Deletes see the keys of every batch, not just the last one.
    def keep_odd() -> Iterator[dict[str, Any]]:
        return (person("A", i) for i in range(1, 23, 2))

    result = mirror_sync(
        url, "app.users", keep_odd(), key=["org", "id"], batch_size=3, delete_missing=True
    )
    assert result == MirrorResult(unchanged=11, deleted=12)
    assert [r[1] for r in users(url)] == list(range(1, 23, 2))


def test_a_failing_source_leaves_the_table_as_it_was(url):
    mirror_sync(url, "app.users", [person("A", i) for i in range(3)], key=["org", "id"])
    before = users(url)
    closed = threading.Event()

    async def broken() -> AsyncIterator[dict[str, Any]]:
        for i in range(10):
            yield person("A", i, name="changed")
        raise ConnectionError("the API went away on page 3")

    async def bad_row_on_page_2() -> AsyncIterator[dict[str, Any]]:
        try:
            for i in range(100):
                yield person("A", i) if i != 5 else {"id": i}
        finally:
            closed.set()

    async def main(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
        with pytest.raises(ConnectionError):
            await mirror(conn, "app.users", broken(), key=["org", "id"], batch_size=4)
        with pytest.raises(MirrorError, match="row 5 has keys 'id'"):
            await mirror(conn, "app.users", bad_row_on_page_2(), key=["org", "id"], batch_size=4)
        # The source is closed at once (an HTTP pager lets go of its connection),
        # and the temporary tables went with the rolled-back transaction.
        assert closed.is_set()
        cur = await conn.execute(
            "SELECT to_regclass('pg_temp.syncworker_mirror_stage'),"
            " to_regclass('pg_temp.syncworker_mirror_seen')"
        )
        return await cur.fetchall()

    assert on_conn(url, main) == [(None, None)]
    assert users(url) == before


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        (
            [{"org": "A", "id": 1, "nmae": "typo", "colour": 1}],
            {},
            r"table app\.users has no column\(s\) 'nmae', 'colour' \(keys of row 0",
        ),
        (
            [person("A", 1), person("A", 2), {"org": "A", "id": 3, "name": "x", "mail": "y"}],
            {"batch_size": 2},
            r"row 2 has keys 'org', 'id', 'name', 'mail' but row 0 has 'org', 'id', 'name', "
            r"'email' \(missing: 'email'; unexpected: 'mail'\)",
        ),
        (
            [person("A", 1), "not a dict"],
            {},
            r"row 1 is a str, not a dict",
        ),
        (
            [person("A", 1)],
            {"key": ["id"]},
            r"key \(id\) of table app\.users is not covered by a unique index or constraint"
            r".*ON CONFLICT.*unique keys: \(org, id\)",
        ),
        (
            [person("A", 1)],
            {"key": ["org", "nope"]},
            r"table app\.users has no column\(s\) 'nope'",
        ),
        (
            [{"id": 1, "name": "x"}],
            {},
            r"the rows lack key column\(s\) 'org'",
        ),
        (
            [person("A", 1), person("A", 2), person("A", 1)],
            {"batch_size": 2},
            r"key \(org, id\)=\(A, 1\) appears more than once in the rows",
        ),
        (
            [person("A", 1), {"org": "A", "id": None, "name": "x", "email": None}],
            {},
            r"row 1 has no value for key column 'id'",
        ),
        (
            [person("A", 1), person("A", 2), {**person("A", 3), "id": "three"}],
            {"batch_size": 2},
            r"app\.users: row 2: invalid input syntax for type integer: \"three\"",
        ),
        (
            [person("A", 1), {**person("A", 2), "id": 2**40}],
            {},
            r"app\.users: row 1: value \"1099511627776\" is out of range for type integer",
        ),
        (
            [person("A", 1), {**person("A", 2), "name": object()}],
            {},
            r"app\.users: row 1: cannot adapt type 'object'",
        ),
        (
            [person("A", 1)],
            {"changes_table": "test_log"},
            r"changes table public\.test_log lacks column\(s\) table_name, kind, key, old, new,"
            r" changed_at; create it with syncworker\.mirror\.changes_table_ddl",
        ),
        ([person("A", 1)], {"batch_size": 0}, r"batch_size must be a positive integer"),
        (person("A", 1), {}, r"rows must be an iterable of dicts"),
        ([person("A", 1)], {"table": "app.nope"}, r"table app\.nope does not exist"),
    ],
)
def test_bad_input_fails_clearly_and_changes_nothing(url, rows, kwargs, message):
    mirror_sync(url, "app.users", [person("A", 1, name="kept")], key=["org", "id"])
    before = users(url)
    kwargs = {"key": ["org", "id"], **kwargs}
    table = kwargs.pop("table", "app.users")

    async def refused_then_fine(conn: psycopg.AsyncConnection[Any]) -> MirrorResult:
        with pytest.raises(MirrorError, match=message):
            await mirror(conn, table, rows, **kwargs)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        # The same connection goes on working: the refused mirror rolled back.
        return await mirror(conn, "app.users", [person("A", 1, name="kept")], key=["org", "id"])

    assert on_conn(url, refused_then_fine) == MirrorResult(unchanged=1)
    assert users(url) == before


def test_identifiers_that_need_quotes(url):
    execute(
        url,
        'CREATE SCHEMA "Sync Data";'
        ' CREATE TABLE "Sync Data"."Org Users" ("Org" text, "User Id" int, "Full Name" text,'
        ' "select" text, t int, UNIQUE ("Org", "User Id"));'
        + changes_table_ddl(("Sync Data", "Change Log")),
    )
    # "t" is also the statements' alias of the table: the row must still be the row.
    rows = [
        {"User Id": 1, "Full Name": "Ann", "select": "x", "t": 1},
        {"User Id": 2, "Full Name": "Bo", "select": None, "t": 2},
    ]
    kwargs: dict[str, Any] = {
        "key": ["Org", "User Id"],
        "scope": "RIO",
        "scope_column": "Org",
        "changes_table": "Sync Data.Change Log",
    }
    assert mirror_sync(url, "Sync Data.Org Users", rows, **kwargs) == MirrorResult(inserted=2)
    rows[1]["Full Name"] = "Bob"
    result = mirror_sync(url, ("Sync Data", "Org Users"), rows[1:], delete_missing=True, **kwargs)
    assert result == MirrorResult(updated=1, deleted=1)
    assert query(url, 'SELECT * FROM "Sync Data"."Org Users"') == [("RIO", 2, "Bob", None, 2)]
    kinds = query(url, 'SELECT kind, key, old, new FROM "Sync Data"."Change Log" ORDER BY id')
    assert [k[0] for k in kinds] == ["insert", "insert", "update", "delete"]
    assert kinds[2][1] == {"Org": "RIO", "User Id": 2}
    assert kinds[2][2:] == (
        {"Org": "RIO", "User Id": 2, "Full Name": "Bo", "select": None, "t": 2},
        {"Org": "RIO", "User Id": 2, "Full Name": "Bob", "select": None, "t": 2},
    )
    assert kinds[3][1] == {"Org": "RIO", "User Id": 1}
    assert kinds[3][2]["t"] == 1
    # Names are literal: no case folding, so the lower-case spelling is another table.
    with pytest.raises(MirrorError, match=r"table sync data\.org users does not exist"):
        mirror_sync(url, "sync data.org users", rows, **kwargs)


def test_json_values_and_types_without_equality(url):
    rows = [
        person("A", 1, tags={"a": [1, 2]}, extra={"x": 1}),
        person("A", 2, tags=[1], extra=None),
    ]
    rows = [{**r, "seen_at": "2024-05-01T10:00:00Z"} for r in rows]
    assert mirror_sync(url, "app.users", rows, key=["org", "id"]) == MirrorResult(inserted=2)
    # jsonb compares by value; json (no equality operator) compares as text.
    assert mirror_sync(url, "app.users", rows, key=["org", "id"]) == MirrorResult(unchanged=2)
    rows[0]["extra"] = {"x": 2}
    assert mirror_sync(url, "app.users", rows, key=["org", "id"]) == MirrorResult(
        updated=1, unchanged=1
    )
    assert query(url, "SELECT tags, extra FROM app.users ORDER BY id") == [
        ({"a": [1, 2]}, {"x": 2}),
        ([1], None),
    ]


def test_ctx_mirror_adds_to_the_run_counters(url):
    run, step = Counters(), Counters()

    async def main(conn: psycopg.AsyncConnection[Any]) -> MirrorResult:
        @asynccontextmanager
        async def lend() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
            yield conn

        ctx = SyncContext(
            run_id=42,
            job="people",
            scope="A",
            source="test",
            triggered_by=None,
            payload={},
            attempt=1,
            log=structlog.get_logger(),
            stopping=StopRequest(asyncio.Event()),
            _connect=lend,
            _run_counters=run,
            _step_counters=step,
        )
        await ctx.mirror(
            "app.users",
            [{"id": i, "name": "n"} for i in range(3)],
            key=["org", "id"],
            scope_column="org",
        )
        return await ctx.mirror(
            "app.users",
            [{"id": i, "name": "m" if i else "n"} for i in range(2)],
            key=["org", "id"],
            scope_column="org",
            delete_missing=True,
            changes_table="app.changes",
        )

    assert on_conn(url, main) == MirrorResult(updated=1, unchanged=1, deleted=1)
    assert (run.inserted, run.updated, run.deleted, run.processed) == (3, 1, 1, 6)
    assert vars(step) == vars(run)
    assert query(url, "SELECT DISTINCT run_id, scope FROM app.changes") == [(42, "A")]


def test_through_a_real_daemon(database_url, tmp_path, start):
    execute(database_url, PEOPLE_SQL)
    jobs = """
[jobs.people]
scopes = ["RIO", "HOU"]
steps = ["sw_mirrorjobs:mirror_payload"]
"""
    start(write_config(tmp_path / "c.toml", database_url, jobs))

    def run(scope: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        [(run_id,)] = query(
            database_url,
            "SELECT run_id FROM syncworker.trigger('people', scope => %s, payload => %s)",
            (scope, json.dumps({"rows": rows})),
        )
        return wait_until(
            lambda: next(
                iter(
                    query(
                        database_url,
                        "SELECT row_to_json(r) FROM syncworker.runs r"
                        " WHERE id = %s AND status IN ('succeeded', 'failed')",
                        (run_id,),
                    )
                ),
                (None,),
            )[0],
            timeout=60,
            what=f"run {run_id} to finish",
        )

    first = run("RIO", [{"id": i, "name": f"n{i}"} for i in range(5)])
    assert first["status"] == "succeeded", first["error"]
    assert (first["records_inserted"], first["records_updated"], first["records_deleted"]) == (
        5,
        0,
        0,
    )
    hou = run("HOU", [{"id": 1, "name": "h"}])
    assert hou["status"] == "succeeded" and hou["records_inserted"] == 1

    rows = [{"id": 0, "name": "n0"}, {"id": 1, "name": "changed"}, {"id": 9, "name": "new"}]
    second = run("RIO", rows)
    assert second["status"] == "succeeded", second["error"]
    counts = (second["records_inserted"], second["records_updated"], second["records_deleted"])
    assert counts == (1, 1, 3)
    assert second["records_processed"] == 6  # the unchanged row counts as processed
    assert query(database_url, "SELECT org, id, name FROM mirror_people ORDER BY org, id") == [
        ("HOU", 1, "h"),
        ("RIO", 0, "n0"),
        ("RIO", 1, "changed"),
        ("RIO", 9, "new"),
    ]
    log = query(
        database_url,
        "SELECT kind, count(*) FROM mirror_changes WHERE run_id = %s GROUP BY kind ORDER BY kind",
        (second["id"],),
    )
    assert log == [("delete", 3), ("insert", 1), ("update", 1)]

    bad = run("HOU", [{"id": 1, "name": "x", "org": "RIO"}])
    assert bad["status"] == "failed"
    assert "belongs to scope 'RIO', not to this run's scope 'HOU'" in bad["error"]


def test_binary_copy_only_for_values_with_an_exact_binary_form():
    def column(base: str) -> Column:
        return Column(name="c", type=base, base=base, comparable=True, generated=False)

    aware = datetime(2024, 1, 1, tzinfo=UTC)
    fits = [
        ("integer", [1, None, -(2**31)]),
        ("bigint", [2**40]),
        ("double precision", [1.5, 2]),
        ("numeric", [Decimal("1.5"), 3]),
        ("text", ["x", None]),
        ("timestamp with time zone", [aware]),
        ("timestamp without time zone", [aware.replace(tzinfo=None)]),
        ("date", [date(2024, 1, 1)]),
        ("jsonb", [Jsonb({"a": 1})]),
    ]
    for base, values in fits:
        assert binary_types([column(base)], [(v,) for v in values]) is not None, (base, values)
    text = [
        ("integer", [2**31]),  # psycopg's binary int4 would wrap it silently
        ("integer", [True]),
        ("integer", ["5"]),
        ("numeric", [1.5]),
        ("timestamp with time zone", ["2024-01-01T00:00:00Z"]),
        ("timestamp with time zone", [aware, aware.replace(tzinfo=None)]),
        ("timestamp without time zone", [aware]),
        ("date", [aware]),
        ("integer[]", [[1, 2]]),
    ]
    for base, values in text:
        assert binary_types([column(base)], [(v,) for v in values]) is None, (base, values)
