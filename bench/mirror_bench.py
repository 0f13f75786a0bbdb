"""ctx.mirror against a naive upsert (psycopg `executemany` of one
INSERT ... ON CONFLICT DO UPDATE per row) on a 10-column table.

    .venv/bin/python bench/mirror_bench.py [--rows 100000] [--repeat 5] [--batch-size 5000]

The source has --rows rows: half are new, half exist already, and of those a
fifth differ from the table. Before every timed run the table is reset to
the same starting state, and after it both methods must leave the same
contents. Prints median seconds, rows/s and the ratio, and writes
bench/results/mirror.json. Starts its own throwaway PostgreSQL, or uses
$SYNCWORKER_BENCH_DATABASE_URL when set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).parent.parent))
from syncworker.embedded import EmbeddedPostgres
from syncworker.mirror import DEFAULT_BATCH_SIZE, mirror

RESULTS = Path(__file__).parent / "results" / "mirror.json"
TABLE = """
DROP TABLE IF EXISTS bench_people;
CREATE TABLE bench_people (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    city text,
    age int,
    score double precision,
    active boolean,
    created_at timestamptz,
    updated_at timestamptz,
    note text
)
"""
COLUMNS = [
    "id",
    "name",
    "email",
    "city",
    "age",
    "score",
    "active",
    "created_at",
    "updated_at",
    "note",
]
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def person(i: int, version: int = 0) -> dict[str, Any]:
    return {
        "id": i,
        "name": f"Person {i}",
        "email": f"person{i}@example.com",
        "city": ("Rio", "Houston", "Oslo", "Lagos")[i % 4],
        "age": 20 + i % 50,
        "score": i / 7 + version,
        "active": i % 3 != 0,
        "created_at": EPOCH + timedelta(minutes=i),
        "updated_at": EPOCH + timedelta(minutes=i, days=version),
        "note": None if i % 5 else f"note {i} v{version}",
    }


def source(rows: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(starting rows, source rows): the source's first half exists, one in
    five of those changed; its second half is new."""
    existing = rows // 2
    start = [person(i) for i in range(existing)]
    src = [person(i, version=1 if i % 5 == 0 else 0) for i in range(rows)]
    return start, src


async def reset(conn: psycopg.AsyncConnection[Any], start: list[dict[str, Any]]) -> None:
    await conn.execute(TABLE)
    cols = ", ".join(COLUMNS)
    async with conn.cursor() as cur, cur.copy(f"COPY bench_people ({cols}) FROM STDIN") as copy:
        for row in start:
            await copy.write_row([row[c] for c in COLUMNS])
    await conn.execute("VACUUM ANALYZE bench_people")


async def contents(conn: psycopg.AsyncConnection[Any]) -> str:
    cur = await conn.execute(
        "SELECT count(*) || ':' || md5(string_agg(t::text, ',' ORDER BY id)) FROM bench_people t"
    )
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def run_mirror(
    conn: psycopg.AsyncConnection[Any], rows: list[dict[str, Any]], batch_size: int
) -> dict[str, int]:
    result = await mirror(conn, "bench_people", rows, key=["id"], batch_size=batch_size)
    return {"inserted": result.inserted, "updated": result.updated, "unchanged": result.unchanged}


async def run_naive(
    conn: psycopg.AsyncConnection[Any], rows: list[dict[str, Any]], batch_size: int
) -> dict[str, int]:
    sets = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
    statement = (
        f"INSERT INTO bench_people ({', '.join(COLUMNS)})"
        f" VALUES ({', '.join(f'%({c})s' for c in COLUMNS)})"
        f" ON CONFLICT (id) DO UPDATE SET {sets}"
    )
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(statement, rows)
    return {}


Method = Callable[
    [psycopg.AsyncConnection[Any], list[dict[str, Any]], int], Awaitable[dict[str, int]]
]


async def measure(url: str, rows: int, repeat: int, batch_size: int) -> dict[str, Any]:
    start, src = source(rows)
    methods: dict[str, Method] = {"mirror": run_mirror, "naive_executemany": run_naive}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    outcome: dict[str, str] = {}
    counts: dict[str, int] = {}
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for rep in range(repeat):
            # Alternate the order so neither method always runs on a warmer server.
            order = list(methods) if rep % 2 == 0 else list(reversed(methods))
            for name in order:
                await reset(conn, start)
                began = time.perf_counter()
                result = await methods[name](conn, src, batch_size)
                seconds[name].append(time.perf_counter() - began)
                outcome.setdefault(name, await contents(conn))
                counts = result or counts
                print(f"  rep {rep + 1} {name}: {seconds[name][-1]:.3f} s", file=sys.stderr)
        cur = await conn.execute("SHOW server_version")
        version = await cur.fetchone()
    if outcome["mirror"] != outcome["naive_executemany"]:
        raise SystemExit(f"the methods disagree on the final table: {outcome}")
    summary = {
        name: {
            "median_seconds": statistics.median(values),
            "rows_per_second": rows / statistics.median(values),
            "seconds": values,
        }
        for name, values in seconds.items()
    }
    return {
        "command": "python bench/mirror_bench.py "
        f"--rows {rows} --repeat {repeat} --batch-size {batch_size}",
        "rows": rows,
        "columns": len(COLUMNS),
        "existing_rows": len(start),
        "mirror_counts": counts,
        "repeat": repeat,
        "batch_size": batch_size,
        "results": summary,
        "ratio_mirror_over_naive": summary["mirror"]["rows_per_second"]
        / summary["naive_executemany"]["rows_per_second"],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgres": version[0] if version else None,
            "psycopg": psycopg.__version__,
            "database": "external"
            if os.environ.get("SYNCWORKER_BENCH_DATABASE_URL")
            else "embedded",
        },
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    with ExitStack() as stack:
        url = os.environ.get("SYNCWORKER_BENCH_DATABASE_URL")
        if not url:
            url = stack.enter_context(EmbeddedPostgres()).url
        report = asyncio.run(measure(url, args.rows, args.repeat, args.batch_size))
    for name, result in report["results"].items():
        print(
            f"{name:>18}: median {result['median_seconds']:.3f} s,"
            f" {result['rows_per_second']:,.0f} rows/s"
        )
    print(f"{'ratio':>18}: mirror is {report['ratio_mirror_over_naive']:.1f}x the naive upsert")
    print(f"{'mirror counts':>18}: {report['mirror_counts']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
