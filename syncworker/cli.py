"""The `syncworker` command: run, trigger, status, check, migrate.

Exit codes: 0 ok; 1 a run failed (trigger --wait) or an unexpected error;
2 timeout (trigger --wait) or bad usage; 69 database unreachable (EX_UNAVAILABLE);
78 configuration error (EX_CONFIG).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import psycopg
import typer

from syncworker import schedule
from syncworker.api import TriggerError, trigger_sync
from syncworker.config import ConfigError, Settings, config_path, load_config
from syncworker.logs import make_logger, redact
from syncworker.status import render, to_json
from syncworker.steps import resolve_job_steps
from syncworker.store import Store
from syncworker.version import VERSION

EX_UNAVAILABLE = 69
EX_CONFIG = 78
TERMINAL = ("succeeded", "failed", "cancelled", "skipped")
T = TypeVar("T")
_NOT_SET_UP = "schema {!r} is not set up: run `syncworker migrate`"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="A PostgreSQL-coordinated sync daemon: cron schedules + NOTIFY triggers.",
)

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


def main() -> None:
    app()


def _fail(code: int, message: str) -> NoReturn:
    typer.echo(f"syncworker: {redact(message)}", err=True)
    raise typer.Exit(code)


def _settings(config: Path | None, database_url: str | None, *, required: bool) -> Settings:
    try:
        settings = load_config(config, required=required)
    except ConfigError as exc:
        _fail(EX_CONFIG, f"config error: {exc}")
    if database_url:
        settings = settings.model_copy(update={"database_url": database_url})
    return settings


async def _connect(settings: Settings) -> psycopg.AsyncConnection[Any]:
    try:
        return await psycopg.AsyncConnection.connect(
            settings.database_url, autocommit=True, connect_timeout=10
        )
    except psycopg.OperationalError as exc:
        _fail(EX_UNAVAILABLE, f"cannot reach the database: {str(exc).strip()}")


def _run_async(coro: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await coro()

    return asyncio.run(wrapper())


@app.command()
def run(
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    embedded: Annotated[
        bool,
        typer.Option(
            "--embedded",
            help="Start a throwaway local PostgreSQL (needs the 'embedded' extra) and use it.",
        ),
    ] = False,
) -> None:
    """Run the daemon until SIGTERM/SIGINT, then drain and exit 0."""
    from syncworker.worker import Worker

    settings = _settings(config, database_url, required=True)
    server = None
    if embedded:
        from syncworker.embedded import EmbeddedPostgres, EmbeddedUnavailable

        try:
            server = EmbeddedPostgres().start()
        except EmbeddedUnavailable as exc:
            _fail(EX_CONFIG, str(exc))
        settings = settings.model_copy(update={"database_url": server.url})
        typer.echo(
            f"embedded PostgreSQL: {server.url}\n"
            f"  trigger every job:  psql '{server.url}' -c \"NOTIFY {settings.channel}\"\n"
            f"  see the runs:       syncworker status --database-url '{server.url}'",
            err=True,
        )
    try:
        log = make_logger(settings.log_level, settings.log_format)
        try:
            worker = Worker(settings, log=log, config_source=str(config_path(config)))
        except ConfigError as exc:
            _fail(EX_CONFIG, f"config error: {exc}")
        asyncio.run(_serve(worker))
    finally:
        if server is not None:
            server.close()


async def _serve(worker: Any) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


@app.command()
def trigger(
    job: Annotated[str, typer.Argument(help="The job to run.")],
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", "-s", help="A scope to run (repeatable); default: all."),
    ] = None,
    source: Annotated[str, typer.Option(help="Recorded as the runs' source.")] = "cli",
    by: Annotated[
        str | None,
        typer.Option("--by", help="Recorded as triggered_by (default: the database user)."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the runs end.")] = False,
    timeout: Annotated[
        float, typer.Option(help="With --wait: give up after this many seconds (exit 2).")
    ] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Request runs of JOB now. With --wait, exit 0 if all succeeded, 1 if not, 2 on timeout."""
    settings = _settings(config, database_url, required=False)
    code = _run_async(
        lambda: _trigger(settings, job, scope or None, source, by, wait, timeout, as_json)
    )
    raise typer.Exit(code)


async def _trigger(
    settings: Settings,
    job: str,
    scopes: list[str] | None,
    source: str,
    by: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> int:
    conn = await _connect(settings)
    async with conn:
        if wait:
            # Listen before triggering so no event of ours can slip past.
            await conn.execute(
                psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(settings.events_channel))
            )
        try:
            ids = await trigger_sync(
                conn, job, scopes=scopes, source=source, triggered_by=by, schema=settings.schema
            )
        except TriggerError as exc:
            _fail(1, str(exc))
        except psycopg.errors.UndefinedFunction:
            _fail(EX_CONFIG, _NOT_SET_UP.format(settings.schema))
        if not wait:
            typer.echo(json.dumps({"runs": ids}) if as_json else " ".join(map(str, ids)))
            return 0
        if not as_json:
            typer.echo(f"runs {', '.join(map(str, ids))}: waiting", err=True)
        final = await _wait_for_runs(conn, settings, ids, timeout, as_json)
    if final is None:
        if as_json:
            typer.echo(json.dumps({"runs": ids, "timeout": True}))
        else:
            typer.echo(f"timed out after {timeout:g} s", err=True)
        return 2
    if as_json:
        typer.echo(json.dumps({"runs": final}, default=str))
    ok = all(r["status"] == "succeeded" for r in final)
    return 0 if ok else 1


async def _wait_for_runs(
    conn: psycopg.AsyncConnection[Any],
    settings: Settings,
    ids: list[int],
    timeout: float,
    quiet: bool,
) -> list[dict[str, Any]] | None:
    """Follow run events until every run ended; None on timeout."""
    store = Store(settings.schema, settings.events_channel)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    wanted = set(ids)
    shown: dict[int, str] = {}
    while True:
        rows = {i: await store.read_run(conn, i) for i in wanted}
        for run_id, row in rows.items():
            if row is not None and shown.get(run_id) != row["status"]:
                shown[run_id] = row["status"]
                if not quiet:
                    typer.echo(_progress_line(row), err=True)
        if all(r is not None and r["status"] in TERMINAL for r in rows.values()):
            return [rows[i] for i in ids if rows[i] is not None]  # type: ignore[misc]
        remaining = deadline - loop.time()
        if remaining <= 0:
            return None
        # Woken by the next event about one of our runs; re-read at least every
        # 5 s in case an event was missed while the connection was busy.
        async for notify in conn.notifies(timeout=min(remaining, 5.0)):
            try:
                event = json.loads(notify.payload)
            except ValueError:
                continue
            if event.get("run_id") in wanted:
                break


def _progress_line(row: dict[str, Any]) -> str:
    scope = f"/{row['scope']}" if row["scope"] else ""
    text = f"run {row['id']} {row['job']}{scope}: {row['status']}"
    if row["records_total"]:
        text += f" {row['records_processed']}/{row['records_total']}"
    elif row["records_processed"]:
        text += f" {row['records_processed']} records"
    if row["error"]:
        text += f" ({row['error'].splitlines()[0][:200]})"
    return text


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="How many recent runs.")] = 20,
    job: Annotated[str | None, typer.Option("--job", help="Only this job.")] = None,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Workers, jobs, recent runs and a summary."""
    settings = _settings(config, database_url, required=False)

    async def read() -> dict[str, Any]:
        conn = await _connect(settings)
        async with conn:
            try:
                return await Store(settings.schema, settings.events_channel).read_status(
                    conn, limit=limit, job=job
                )
            except psycopg.errors.UndefinedTable:
                _fail(
                    EX_CONFIG, f"schema {settings.schema!r} is not set up: run `syncworker migrate`"
                )

    data = _run_async(read)
    typer.echo(to_json(data) if as_json else render(data))


@app.command()
def check(config: ConfigOpt = None, database_url: DatabaseOpt = None) -> None:
    """Validate the config, import every step, show next fires, try the database."""
    settings = _settings(config, database_url, required=True)
    source = str(config_path(config))
    now = datetime.now(UTC)
    for name, job in settings.jobs.items():
        try:
            steps = resolve_job_steps(name, job, source)
        except ConfigError as exc:
            _fail(EX_CONFIG, f"config error: {exc}")
        state = "" if job.enabled else " (disabled)"
        typer.echo(f"job {name}{state}: {len(steps)} step(s)")
        for step in steps:
            typer.echo(f"  step  {step.name}")
        if job.scopes:
            typer.echo(f"  scopes {', '.join(job.scopes)}")
        elif job.scopes_sql:
            typer.echo(f"  scopes from SQL: {job.scopes_sql}")
        fires = schedule.upcoming(job.schedule, job.zone, now, 3)
        for fire in fires:
            typer.echo(f"  fires {fire.isoformat()}")
        if not fires:
            typer.echo("  no schedule (triggered only)")

    async def ping() -> str:
        conn = await _connect(settings)
        async with conn:
            cur = await conn.execute("SELECT current_setting('server_version')")
            row = await cur.fetchone()
            return str(row[0]) if row else "?"

    typer.echo(f"database: reachable (PostgreSQL {_run_async(ping)})")
    typer.echo("config: ok")


@app.command()
def migrate(config: ConfigOpt = None, database_url: DatabaseOpt = None) -> None:
    """Create or upgrade the schema and register the config's jobs."""
    settings = _settings(config, database_url, required=True)

    async def go() -> list[int]:
        conn = await _connect(settings)
        async with conn:
            store = Store(settings.schema, settings.events_channel)
            before = await store.migrate(conn)
            await store.setup(conn, settings.jobs)
            return before

    applied = _run_async(go)
    done = ", ".join(map(str, applied)) if applied else "none (up to date)"
    typer.echo(f"schema {settings.schema}: migrations applied: {done}; jobs: {len(settings.jobs)}")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"syncworker {VERSION}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    pass


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
