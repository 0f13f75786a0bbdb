"""The `syncworker` command: run, trigger, status, check, migrate (and the
operators' pause and resume, cli_ops.py).

Exit codes: 0 ok; 1 a run failed (trigger --wait) or an unexpected error;
2 timeout (trigger --wait) or bad usage; 69 database unreachable (EX_UNAVAILABLE);
70 `run` ended without a requested stop (EX_SOFTWARE); 77 the database role
lacks a privilege (EX_NOPERM); 78 configuration error (EX_CONFIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import psycopg
import typer

from syncworker import cli_ops, follow, schedule
from syncworker.api import TriggerError, trigger_sync
from syncworker.cliutil import (
    EX_CONFIG,
    EX_NOPERM,
    NOT_SET_UP,
    ConfigOpt,
    DatabaseOpt,
    config_error,
    connect,
    fail,
    me,
    run_async,
    settings_for,
)
from syncworker.config import ConfigError, Settings, config_path, load_config
from syncworker.db import Store, session
from syncworker.dberrors import first_line
from syncworker.durations import DurationError, parse_duration
from syncworker.exits import EX_SOFTWARE
from syncworker.logs import forward_library_logs, make_logger
from syncworker.status import render, to_json
from syncworker.steps import resolve_job_steps
from syncworker.version import VERSION

if TYPE_CHECKING:
    pass

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # A traceback's locals would print the settings, database password included.
    pretty_exceptions_show_locals=False,
    help="A PostgreSQL-coordinated sync daemon: cron schedules + NOTIFY triggers.",
)


def main() -> None:
    app()


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
    """Run the daemon until SIGTERM/SIGINT, then drain and exit 0.

    Any other end is non-zero: 70 when the worker stopped by itself (a step it
    could not cancel, a step calling os._exit, a crash), 69 or 78 as above."""
    from syncworker.daemon.worker import Worker
    from syncworker.serve import serve

    settings = settings_for(config, database_url, required=True)
    server = None
    if embedded:
        from syncworker.embedded import EmbeddedPostgres, EmbeddedUnavailable

        try:
            server = EmbeddedPostgres().start()
        except EmbeddedUnavailable as exc:
            fail(EX_CONFIG, str(exc))
        settings = settings.model_copy(update={"database_url": server.url})
        typer.echo(
            f"embedded PostgreSQL: {server.url}\n"
            f"  trigger every job:  psql '{server.url}' -c \"NOTIFY {settings.channel}\"\n"
            f"  see the runs:       {me()} status --database-url '{server.url}'",
            err=True,
        )
    try:
        stream = sys.stdout if settings.log_stream == "stdout" else sys.stderr
        log = make_logger(settings.log_level, settings.log_format, stream)
        forward_library_logs(log)
        try:
            worker = Worker(
                settings,
                log=log,
                config_source=str(config_path(config)),
                load=lambda: load_config(config, required=True),
            )
            # Raised from inside too: the `http` address is bound at start.
            code = asyncio.run(serve(worker))
        except ConfigError as exc:
            fail(EX_CONFIG, config_error(exc))
        except psycopg.errors.InsufficientPrivilege as exc:
            reason = first_line(exc)
            fail(EX_NOPERM, f"permission denied: {reason} (README, 'Least-privilege roles')")
        except SystemExit as exc:
            # sys.exit() out of the loop itself (a task a step started): the
            # drain was skipped, so never 0. Steps' own calls fail the step.
            log.error("worker_exit_unrequested", code=exc.code, exit_code=EX_SOFTWARE)
            code = EX_SOFTWARE
    finally:
        if server is not None:
            server.close()
    if code:
        raise typer.Exit(code)


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
    after: Annotated[
        str | None,
        typer.Option(
            "--after",
            metavar="DURATION",
            help="Start no sooner than this from now (30s, 5m, 1h); joins move it later.",
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the runs end.")] = False,
    timeout: Annotated[
        float, typer.Option(help="With --wait: give up after this many seconds (exit 2).")
    ] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Request runs of JOB now (or --after a delay). With --wait, exit 0 if all
    succeeded, 1 if not, 2 on timeout."""
    try:
        delay = None if after is None else parse_duration(after)
    except DurationError as exc:
        fail(2, f"--after: {exc}")
    settings = settings_for(config, database_url, required=False)
    code = run_async(
        lambda: _trigger(settings, job, scope or None, source, by, delay, wait, timeout, as_json)
    )
    raise typer.Exit(code)


async def _trigger(
    settings: Settings,
    job: str,
    scopes: list[str] | None,
    source: str,
    by: str | None,
    delay: timedelta | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> int:
    conn = await connect(settings)
    async with conn:
        if wait:
            # Listen before triggering so no event of ours can slip past.
            await follow.listen(conn, settings.events_channel)
        try:
            ids = await trigger_sync(
                conn,
                job,
                scopes=scopes,
                source=source,
                triggered_by=by,
                run_after=delay,
                schema=settings.schema,
            )
        except TriggerError as exc:
            fail(1, str(exc))
        except (psycopg.errors.InvalidSchemaName, psycopg.errors.UndefinedFunction):
            # No schema at all, or one from before trigger() existed.
            fail(EX_CONFIG, NOT_SET_UP.format(settings.schema, me()))
        if not wait:
            typer.echo(json.dumps({"runs": ids}) if as_json else " ".join(map(str, ids)))
            return 0
        if not as_json:
            typer.echo(f"runs {', '.join(map(str, ids))}: waiting", err=True)
        store = Store(settings.schema, settings.events_channel)
        final = await follow.wait_for_runs(conn, store, ids, timeout, as_json)
    if final is None:
        if as_json:
            typer.echo(json.dumps({"runs": ids, "timeout": True}))
        else:
            typer.echo(f"timed out after {timeout:g} s", err=True)
        return 2
    if as_json:
        typer.echo(to_json({"runs": final}, indent=None))
    ok = all(r["status"] == "succeeded" for r in final)
    return 0 if ok else 1


@app.command()
def status(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (one line per refresh).")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="How many recent runs.")] = 20,
    job: Annotated[str | None, typer.Option("--job", help="Only this job.")] = None,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Refresh at each run event until Ctrl-C."),
    ] = False,
    interval: Annotated[
        float,
        typer.Option(min=0.1, help="With --watch: refresh at least this often, in seconds."),
    ] = 2.0,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Workers, jobs, recent runs and a summary."""
    settings = settings_for(config, database_url, required=False)
    store = Store(settings.schema, settings.events_channel)

    async def read(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
        try:
            return await store.read_status(conn, limit=limit, job=job)
        except psycopg.errors.UndefinedTable:
            fail(EX_CONFIG, NOT_SET_UP.format(settings.schema, me()))

    async def once() -> dict[str, Any]:
        conn = await connect(settings)
        async with conn:
            return await read(conn)

    if not watch:
        data = run_async(once)
        typer.echo(to_json(data) if as_json else render(data))
        return
    live = sys.stdout.isatty()

    def show(data: dict[str, Any]) -> None:
        if as_json:
            typer.echo(to_json(data, indent=None))
            return
        stamp = f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S}Z"
        if live:
            # Home and clear, then the table: the screen shows only the latest.
            typer.echo(f"\x1b[H\x1b[2J{stamp}  every {interval:g}s, Ctrl-C to stop\n")
        else:
            typer.echo(f"--- {stamp} ---")
        typer.echo(render(data) + ("" if live else "\n"))

    async def following() -> None:
        conn = await connect(settings)
        async with conn:
            await follow.listen(conn, settings.events_channel)
            await follow.watch(conn, lambda: read(conn), show, interval)

    # Ctrl-C is how a watch ends: exit 0, not click's "Aborted!" and 1.
    with contextlib.suppress(KeyboardInterrupt):
        run_async(following)


@app.command()
def check(config: ConfigOpt = None, database_url: DatabaseOpt = None) -> None:
    """Validate the config, import every step, show next fires, try the database."""
    settings = settings_for(config, database_url, required=True)
    source = str(config_path(config))
    now = datetime.now(UTC)
    for name, job in settings.jobs.items():
        try:
            steps = resolve_job_steps(name, job, source)
        except ConfigError as exc:
            fail(EX_CONFIG, config_error(exc))
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
        conn = await connect(settings)
        async with conn:
            return await session.server_version(conn)

    typer.echo(f"database: reachable (PostgreSQL {run_async(ping)})")
    typer.echo("config: ok")


@app.command()
def migrate(config: ConfigOpt = None, database_url: DatabaseOpt = None) -> None:
    """Create or upgrade the schema and register the config's jobs."""
    settings = settings_for(config, database_url, required=True)

    async def go() -> list[int]:
        conn = await connect(settings)
        async with conn:
            store = Store(settings.schema, settings.events_channel)
            before = await store.migrate(conn)
            await store.setup(conn, settings.jobs, str(config_path(config)))
            return before

    applied = run_async(go)
    done = ", ".join(map(str, applied)) if applied else "none (up to date)"
    typer.echo(f"schema {settings.schema}: migrations applied: {done}; jobs: {len(settings.jobs)}")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"syncworker {VERSION}")
        raise typer.Exit()


cli_ops.register(app)


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
