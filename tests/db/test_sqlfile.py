"""The named-query file format: what the parser takes and what it refuses."""

from __future__ import annotations

import importlib
import sys

import pytest

from syncworker.db.sqlfile import QueryFileError, parse

GOOD = """\
-- A file's own header comment.

-- fragment: fence
-- The fence.
r.id = %(id)s

-- name: finish :one
-- Finish a run.
-- Why it is written so.
UPDATE {s}.runs AS r SET status = 'x'
WHERE
-- include: fence
RETURNING r.id;

-- name: count_runs :rowcount
-- Count.
DELETE FROM {s}.runs
"""


def test_statements_with_kind_doc_and_includes_resolved() -> None:
    found = parse([("a.sql", GOOD)])
    assert sorted(found) == ["count_runs", "finish"]
    finish = found["finish"]
    assert finish.kind == "one"
    assert finish.doc == "Finish a run. Why it is written so."
    assert (
        finish.text == "UPDATE {s}.runs AS r SET status = 'x'\nWHERE\nr.id = %(id)s\nRETURNING r.id"
    )
    assert finish.identifiers == {"s"}
    assert found["count_runs"].kind == "rowcount"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("-- name: a :some\n-- A.\nSELECT 1\n", "unknown kind"),
        ("-- name: a :one\nSELECT 1\n", "needs a line saying what it is for"),
        ("-- name: a :one\n-- A.\n", "has no SQL"),
        ("SELECT 1\n", "SQL before the first"),
        ("-- name: a :one\n-- A.\n-- include: nope\n", "includes unknown 'nope'"),
        ("-- fragment: f\n-- F.\nx\n-- name: a :one\n-- A.\nSELECT 1\n", "included nowhere: f"),
        (
            "-- fragment: f\n-- F.\n-- include: f\n-- name: a :one\n-- A.\n-- include: f\n",
            "nest too deep",
        ),
    ],
)
def test_a_malformed_file_is_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(QueryFileError, match=why):
        parse([("a.sql", text)])


def test_a_name_is_defined_once_across_files() -> None:
    one = "-- name: a :none\n-- A.\nSELECT 1\n"
    with pytest.raises(QueryFileError, match=r"'a' is defined in x\.sql already"):
        parse([("x.sql", one), ("y.sql", one)])


def test_the_old_import_path_warns_and_gives_the_same_store() -> None:
    sys.modules.pop("syncworker.store", None)
    with pytest.warns(DeprecationWarning, match=r"syncworker\.db"):
        old = importlib.import_module("syncworker.store")
    from syncworker.db import Store, lock_namespace

    assert old.Store is Store
    assert old.lock_namespace is lock_namespace
