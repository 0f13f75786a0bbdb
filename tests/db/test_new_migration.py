"""new_migration copies what changed in db/sql/schema/ into the next migration."""

from __future__ import annotations

import pytest

from syncworker.db import new_migration
from syncworker.db.schema import migrations, schema_files


def test_nothing_differs_between_the_schema_and_the_newest_migrations() -> None:
    assert new_migration.changed(schema_files(), migrations(), []) == ({}, {})


def test_a_changed_function_is_copied_as_create_or_replace() -> None:
    schema = [
        (name, text.replace("LIMIT 3", "LIMIT 5") if name == "11_trigger.sql" else text)
        for name, text in schema_files()
    ]
    changes, new = new_migration.changed(schema, migrations(), [])
    assert list(changes) == ["trigger"] and new == {}
    assert changes["trigger"].startswith("CREATE OR REPLACE FUNCTION __SCHEMA__.trigger(")
    assert "LIMIT 5" in changes["trigger"] and changes["trigger"].endswith("$fn$;")
    text = new_migration.render(10, "reserve_among_five", changes, new)
    assert text.startswith("-- syncworker schema, version 10: reserve among five.\n")


def test_a_new_function_comes_with_the_rest_of_its_file() -> None:
    extra = (
        "-- header\n\nCREATE FUNCTION __SCHEMA__.noop() RETURNS void LANGUAGE sql\n"
        "AS $fn$\n    SELECT\n$fn$;\n\nREVOKE EXECUTE ON FUNCTION __SCHEMA__.noop() FROM PUBLIC;\n"
    )
    changes, new = new_migration.changed([("20_noop.sql", extra)], migrations(), [])
    assert changes == {}
    assert new["noop"].startswith("CREATE FUNCTION") and "REVOKE" in new["noop"]


def test_forcing_an_unknown_function_is_an_error() -> None:
    with pytest.raises(SystemExit):
        new_migration.changed(schema_files(), migrations(), ["nope"])


def test_forcing_copies_an_unchanged_function() -> None:
    changes, _ = new_migration.changed(schema_files(), migrations(), ["claimable"])
    assert list(changes) == ["claimable"]
