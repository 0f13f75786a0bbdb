"""Creating and upgrading the schema, and registering the config's jobs.

The migrations in db/sql/migrations/ are immutable history: an install
applies the ones it has not, in order, each recorded in `migrations`. Their
placeholders (__SCHEMA__, __WAKE__, __LOCK_NS__) are filled with quoted
text rendered by psycopg. db/sql/schema/ shows the schema they build.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from syncworker.config import ConfigError, JobConfig
from syncworker.db import queries
from syncworker.db.base import StoreBase, lock_namespace, wake_channel
from syncworker.db.rows import Found, Version

MIGRATIONS_FOLDER = ("sql", "migrations")
SCHEMA_FOLDER = ("sql", "schema")


def _numbered(folder: tuple[str, ...]) -> list[tuple[int, str]]:
    found = []
    for entry in resources.files("syncworker.db").joinpath(*folder).iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrations() -> list[tuple[int, str]]:
    """Every migration, (version, text), in order."""
    return _numbered(MIGRATIONS_FOLDER)


def schema_files() -> list[tuple[str, str]]:
    """The current schema's files, (name, text), in the order they apply."""
    folder = resources.files("syncworker.db").joinpath(*SCHEMA_FOLDER)
    return sorted(
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )


def render(
    text: str, conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any], schema: str
) -> bytes:
    """A migration or schema file with its placeholders filled for `schema`."""

    schema_text = sql.Identifier(schema).as_string(conn)
    wake_text = sql.Literal(wake_channel(schema)).as_string(conn)
    lock_ns_text = sql.Literal(lock_namespace(schema)).as_string(conn)
    body = (
        text.replace("__SCHEMA__", schema_text)
        .replace("__WAKE__", wake_text)
        .replace("__LOCK_NS__", lock_ns_text)
    )
    return body.encode()


async def fetch_scopes(conn: psycopg.AsyncConnection[Any], query: str) -> tuple[str, ...]:
    """Run a job's scopes_sql (the user's own SQL, from the config): the first
    column of each row, non-empty, unique."""
    cur = await conn.execute(query.encode())
    return tuple(dict.fromkeys(str(row[0]) for row in await cur.fetchall() if row[0]))


class SchemaQueries(StoreBase):
    async def migrate(self, conn: psycopg.AsyncConnection[Any]) -> list[int]:
        """Create or upgrade the schema; returns the versions applied now."""
        q = self.q
        applied_now: list[int] = []
        async with conn.transaction():
            await queries.none(conn, q["migrate_lock"], {"ns": self.lock_ns})
            found = await queries.one(conn, q["schema_exists"], {"schema": self.schema}, Found)
            if found is None:
                await queries.none(conn, q["create_schema"])
            await queries.none(conn, q["create_migrations_table"])
            done = {
                r.version for r in await queries.many(conn, q["applied_migrations"], None, Version)
            }
            for version, text in migrations():
                if version in done:
                    continue
                await conn.execute(render(text, conn, self.schema))
                await queries.none(conn, q["record_migration"], {"version": version})
                applied_now.append(version)
        return applied_now

    async def setup(
        self,
        conn: psycopg.AsyncConnection[Any],
        jobs: Mapping[str, JobConfig],
        source: str = "<config>",
    ) -> dict[str, tuple[str, ...] | None]:
        """Migrate, then register the jobs with their scopes (scopes_sql run now).

        Returns each job's scopes as registered. A scopes_sql the database
        refuses is a ConfigError naming the job's key (`source` is the file).
        """
        await self.migrate(conn)
        scopes: dict[str, tuple[str, ...] | None] = {}
        for name, job in jobs.items():
            if not job.scopes_sql:
                scopes[name] = job.scopes
                continue
            try:
                scopes[name] = await fetch_scopes(conn, job.scopes_sql)
            except psycopg.OperationalError:
                raise  # the connection, not the query: callers wait it out
            except psycopg.Error as exc:
                reason = exc.diag.message_primary or str(exc).strip() or type(exc).__name__
                raise ConfigError(
                    source, f"jobs.{name}.scopes_sql", f"the query failed: {reason}"
                ) from None
        await self.register_jobs(conn, jobs, scopes)
        return scopes

    async def register_jobs(
        self,
        conn: psycopg.AsyncConnection[Any],
        jobs: Mapping[str, JobConfig],
        scopes: Mapping[str, Sequence[str] | None],
    ) -> None:
        """Make syncworker.jobs match the configuration (trigger() reads it)."""
        async with conn.transaction():
            for name, job in jobs.items():
                await queries.none(
                    conn,
                    self.q["register_job"],
                    {
                        "name": name,
                        "enabled": job.enabled,
                        "schedule": list(job.schedule),
                        "timezone": job.timezone,
                        "scopes": None if scopes.get(name) is None else list(scopes[name] or ()),
                        "scopes_sql": job.scopes_sql,
                        "on_overlap": job.on_overlap,
                        "misfire": job.misfire,
                        "retries": job.retries,
                        "timeout": job.timeout,
                        "debounce": job.debounce,
                        "misfire_limit": job.misfire_limit,
                    },
                )
            await queries.none(conn, self.q["delete_unconfigured_jobs"], {"names": list(jobs)})

    async def set_scopes(
        self, conn: psycopg.AsyncConnection[Any], job: str, scopes: Sequence[str]
    ) -> None:
        await queries.none(conn, self.q["set_scopes"], {"scopes": list(scopes), "job": job})
