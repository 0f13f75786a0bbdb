"""The named-query file format, parsed: pure text in, statements out.

A file under db/sql/queries/ is a sequence of blocks:

    -- name: claim_next :one
    -- What the statement is for (required: the line right after the name).
    -- Any further comment lines: why it is written the way it is.
    SELECT ...;

    -- fragment: run_fence
    -- What the fragment is.
    r.id = %(id)s AND ...

A statement's kind says what its wrapper reads back: `:one` (one row or
none), `:many` (every row), `:none` (nothing) and `:rowcount` (the number of
rows the statement touched). A fragment is text that several statements
share; a line `-- include: NAME` in a statement (or in another fragment) is
replaced by it when the files are loaded, so what the server receives is
fixed once at load and nothing is spliced per call. Includes stand on lines
of their own so that each file still reads as SQL.

`{s}` is the schema's identifier; `{{` and `}}` are literal braces (the rules
of psycopg.sql.SQL.format). Parameters are psycopg's named ones, `%(x)s`.
This module does not compose: db/queries.py does, once per schema.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, cast

Kind = Literal["one", "many", "none", "rowcount"]
KINDS: frozenset[str] = frozenset({"one", "many", "none", "rowcount"})

_NAME = re.compile(r"^--\s*name:\s*(?P<name>[a-z_][a-z0-9_]*)\s+:(?P<kind>[a-z]+)\s*$")
_FRAGMENT = re.compile(r"^--\s*fragment:\s*(?P<name>[a-z_][a-z0-9_]*)\s*$")
_INCLUDE = re.compile(r"^\s*--\s*include:\s*(?P<name>[a-z_][a-z0-9_]*)\s*$")
# Deeper than any honest nesting: past it, fragments include each other.
_MAX_DEPTH = 8


class QueryFileError(ValueError):
    """A query file that does not follow the format, with where and why."""


@dataclass(frozen=True)
class Statement:
    name: str
    kind: Kind
    doc: str
    text: str
    source: str

    @property
    def identifiers(self) -> frozenset[str]:
        """The `{name}` placeholders of the text (`s`: the schema)."""
        return frozenset(
            field for _, field, _, _ in string.Formatter().parse(self.text) if field is not None
        )


@dataclass(frozen=True)
class _Block:
    name: str
    kind: Kind | None  # None: a fragment
    doc: str
    body: list[str]
    source: str


def parse(files: Iterable[tuple[str, str]]) -> dict[str, Statement]:
    """Every statement of `files` (pairs of a file's name and its text), by
    name, with its includes resolved. Names are unique across all files,
    fragments and statements alike; every fragment is included somewhere."""
    blocks: dict[str, _Block] = {}
    for source, text in files:
        for block in _blocks(source, text):
            if block.name in blocks:
                first = blocks[block.name].source
                raise QueryFileError(f"{source}: {block.name!r} is defined in {first} already")
            blocks[block.name] = block
    fragments = {n: b for n, b in blocks.items() if b.kind is None}
    used: set[str] = set()
    statements: dict[str, Statement] = {}
    for name, block in blocks.items():
        if block.kind is None:
            continue
        text = _resolve(block, fragments, used, 0)
        statements[name] = Statement(name, block.kind, block.doc, text, block.source)
    unused = sorted(set(fragments) - used)
    if unused:
        raise QueryFileError(f"fragments included nowhere: {', '.join(unused)}")
    return statements


def _blocks(source: str, text: str) -> list[_Block]:
    found: list[_Block] = []
    current: tuple[str, Kind | None, int] | None = None
    lines: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        named = _NAME.match(line)
        fragment = _FRAGMENT.match(line)
        if named or fragment:
            if current is not None:
                found.append(_finish(source, current, lines))
            if named:
                kind = named["kind"]
                if kind not in KINDS:
                    raise QueryFileError(f"{source}:{number}: unknown kind :{kind}")
                current = (named["name"], cast(Kind, kind), number)
            else:
                assert fragment is not None
                current = (fragment["name"], None, number)
            lines = []
        elif current is not None:
            lines.append(line)
        elif line.strip() and not line.startswith("--"):
            raise QueryFileError(f"{source}:{number}: SQL before the first -- name:")
    if current is not None:
        found.append(_finish(source, current, lines))
    return found


def _finish(source: str, head: tuple[str, Kind | None, int], lines: list[str]) -> _Block:
    name, kind, number = head
    doc: list[str] = []
    while lines and lines[0].startswith("--") and not _INCLUDE.match(lines[0]):
        doc.append(lines.pop(0)[2:].strip())
    if not doc or not doc[0]:
        raise QueryFileError(f"{source}:{number}: {name!r} needs a line saying what it is for")
    while lines and not lines[-1].strip():
        lines.pop()
    if lines and lines[-1].rstrip().endswith(";"):
        lines[-1] = lines[-1].rstrip()[:-1]
    if not any(line.strip() for line in lines):
        raise QueryFileError(f"{source}:{number}: {name!r} has no SQL")
    return _Block(name, kind, " ".join(doc), lines, source)


def _resolve(block: _Block, fragments: Mapping[str, _Block], used: set[str], depth: int) -> str:
    if depth > _MAX_DEPTH:
        raise QueryFileError(f"{block.source}: includes nest too deep at {block.name!r}")
    out: list[str] = []
    for line in block.body:
        include = _INCLUDE.match(line)
        if include is None:
            out.append(line)
            continue
        name = include["name"]
        if name not in fragments:
            raise QueryFileError(f"{block.source}: {block.name!r} includes unknown {name!r}")
        used.add(name)
        out.append(_resolve(fragments[name], fragments, used, depth + 1))
    return "\n".join(out)
