"""Write the next migration from the functions changed in db/sql/schema/.

    python -m syncworker.db.new_migration NAME [--function FN ...] [--print]

A function is changed in its schema/ file first; this copies every function
whose definition there differs from the one its newest migration creates
(and any named with --function) into db/sql/migrations/NNN_NAME.sql as
CREATE OR REPLACE, under a header to fill in. A function no migration has
created yet is copied with the rest of its file (its REVOKE, its trigger).
Table changes are not derived: write their ALTER TABLE by hand;
tests/db/test_schema_matches_migrations.py says what still differs.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

_FUNCTION = re.compile(
    r"^CREATE (?:OR REPLACE )?FUNCTION __SCHEMA__\.(?P<name>\w+)\(.*?^\$fn\$;$",
    re.S | re.M,
)
_NAME = re.compile(r"^[a-z0-9_]+$")


def functions(text: str) -> dict[str, str]:
    """Each function a file creates, by name: its statement, as CREATE OR REPLACE."""
    found = {}
    for m in _FUNCTION.finditer(text):
        statement = m.group(0)
        found[m["name"]] = re.sub(r"^CREATE (OR REPLACE )?", "CREATE OR REPLACE ", statement)
    return found


def changed(
    schema: Iterable[tuple[str, str]], migrations: Iterable[tuple[int, str]], force: Sequence[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(changed, new): the functions of `schema` whose statement differs from
    the newest migration's (or named in `force`), and those of functions no
    migration creates, as the whole schema file after its header."""
    latest: dict[str, str] = {}
    for _version, text in sorted(migrations):
        latest.update(functions(text))
    out: dict[str, str] = {}
    new: dict[str, str] = {}
    for _name, text in schema:
        for fn, statement in functions(text).items():
            if fn not in latest:
                new[fn] = _without_header(text)
            elif statement != latest[fn] or fn in force:
                out[fn] = statement
    unknown = sorted(set(force) - set(out) - set(new))
    if unknown:
        raise SystemExit(f"no function in db/sql/schema/ named {', '.join(unknown)}")
    return out, new


def _without_header(text: str) -> str:
    lines = text.splitlines()
    while lines and (lines[0].startswith("--") or not lines[0].strip()):
        lines.pop(0)
    return "\n".join(lines) + "\n"


def render(version: int, name: str, changes: dict[str, str], new: dict[str, str]) -> str:
    title = name.replace("_", " ")
    parts = [
        f"-- syncworker schema, version {version}: {title}.\n"
        "--\n"
        "-- TODO: why, what an existing install sees, and what workers of the\n"
        "-- previous version still running during a rolling upgrade need.\n"
        "-- CREATE OR REPLACE keeps a function's grants; a new function (or a new\n"
        "-- signature) is executable by PUBLIC until revoked here (see 002).\n"
    ]
    for fn, statement in sorted(changes.items()):
        parts.append(f"-- {fn}(), as in db/sql/schema/.\n{statement}\n")
    for fn, text in sorted(new.items()):
        parts.append(f"-- {fn}(), new, as in db/sql/schema/.\n{text}")
    if not changes and not new:
        parts.append("-- No function changed in db/sql/schema/: the statements go here.\n")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m syncworker.db.new_migration")
    parser.add_argument("name", help="what the migration does, in snake_case")
    parser.add_argument("--function", action="append", default=[], help="copy this one too")
    parser.add_argument("--print", action="store_true", help="print it; write nothing")
    args = parser.parse_args(argv)
    if not _NAME.match(args.name):
        parser.error("NAME: lower case letters, digits and underscores")
    # The source tree's folders, not the installed package's: the file is
    # meant to be committed.
    sql = Path(__file__).resolve().parent / "sql"
    migrations = [(int(p.name[:3]), p.read_text("utf-8")) for p in sql.glob("migrations/*.sql")]
    schema = [(p.name, p.read_text("utf-8")) for p in sorted(sql.glob("schema/*.sql"))]
    changes, new = changed(schema, migrations, args.function)
    version = max((v for v, _ in migrations), default=0) + 1
    text = render(version, args.name, changes, new)
    if args.print:
        sys.stdout.write(text)
        return 0
    path = sql / "migrations" / f"{version:03d}_{args.name}.sql"
    path.write_text(text, encoding="utf-8")
    copied = ", ".join(sorted([*changes, *new])) or "no function"
    print(f"wrote {path} ({copied}); fill in its header, then run the schema test")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
