"""What every `syncworker` command shares: exit codes, the --config and
--database-url options, loading the settings, connecting, and turning the
database's refusals into one line and an exit code (no traceback)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import psycopg
import typer

from syncworker.config import ConfigError, Settings, load_config
from syncworker.dberrors import config_problem, first_line
from syncworker.logs import redact

EX_UNAVAILABLE = 69
EX_NOPERM = 77
EX_CONFIG = 78
T = TypeVar("T")
NOT_SET_UP = "schema {!r} is not set up: run `{} migrate`"

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (default: $SYNCWORKER_CONFIG, else ./syncworker.toml)",
        show_default=False,
    ),
]
DatabaseOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL URL (default: config, $SYNCWORKER_DATABASE_URL, $DATABASE_URL, libpq)",
        show_default=False,
    ),
]


def me() -> str:
    """How to run this command again from the user's shell: `syncworker` only
    when that is on PATH (in a fresh checkout it is `.venv/bin/syncworker`)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name != "syncworker":
        return f"{Path(sys.executable).name} -m syncworker"  # python -m syncworker
    found = shutil.which("syncworker")
    if found and Path(found).resolve() == Path(argv0).resolve():
        return "syncworker"
    return argv0


def fail(code: int, message: str) -> NoReturn:
    typer.echo(f"syncworker: {redact(message)}", err=True)
    raise typer.Exit(code)


def config_error(exc: ConfigError) -> str:
    """The one line for a config error; a step that cannot be imported also
    says where Python looked, the usual miss being an unset PYTHONPATH."""
    text = f"config error: {exc}"
    if exc.reason.startswith("cannot import "):
        path = os.environ.get("PYTHONPATH")
        now = f"PYTHONPATH={path}" if path else "PYTHONPATH is unset"
        text += (
            f" (install the step's package into {sys.executable}, or put its directory"
            f" on PYTHONPATH; {now})"
        )
    return text


def settings_for(config: Path | None, database_url: str | None, *, required: bool) -> Settings:
    try:
        settings = load_config(config, required=required)
    except ConfigError as exc:
        fail(EX_CONFIG, f"config error: {exc}")
    if database_url:
        settings = settings.model_copy(update={"database_url": database_url})
    try:
        # A malformed URL is a config error, said once: libpq's own message
        # would quote the whole URL, password included, on every retry.
        psycopg.conninfo.conninfo_to_dict(settings.database_url)
    except psycopg.ProgrammingError:
        fail(EX_CONFIG, "config error: database_url: not a valid connection URL or string")
    return settings


async def connect(settings: Settings) -> psycopg.AsyncConnection[Any]:
    try:
        # No server-side prepared statements: a CLI call is short, and a
        # transaction-mode pooler (`trigger --wait` polls) cannot keep them.
        return await psycopg.AsyncConnection.connect(
            settings.database_url, autocommit=True, connect_timeout=10, prepare_threshold=None
        )
    except psycopg.OperationalError as exc:
        reason = config_problem(exc)
        if reason is not None:
            fail(EX_CONFIG, f"config error: database_url: the server refused it: {reason}")
        fail(EX_UNAVAILABLE, f"cannot reach the database: {str(exc).strip()}")


def run_async(coro: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await coro()

    try:
        return asyncio.run(wrapper())
    except ConfigError as exc:  # found only against the database: a scopes_sql
        fail(EX_CONFIG, f"config error: {exc}")
    except psycopg.errors.InsufficientPrivilege as exc:
        reason = first_line(exc)
        fail(
            EX_NOPERM,
            f"permission denied: {reason} (the roles each command needs:"
            " README, 'Least-privilege roles')",
        )
    except psycopg.errors.QueryCanceled as exc:
        # A statement_timeout (or an operator's cancel): the database is there.
        fail(
            EX_UNAVAILABLE,
            f"timed out: the database cancelled the query ({str(exc).strip()});"
            " a statement_timeout on this role or database may be too short",
        )
    except psycopg.OperationalError as exc:
        fail(EX_UNAVAILABLE, f"lost the database: {str(exc).strip()}")
