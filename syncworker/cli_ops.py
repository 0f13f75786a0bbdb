"""The operators' commands: `pause`, `resume`, `cancel` (control.py does the
work) and `backfill` (backfill.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

import psycopg
import typer

from syncworker.backfill import Backfill, backfill
from syncworker.cliutil import (
    EX_CONFIG,
    NOT_SET_UP,
    ConfigOpt,
    DatabaseOpt,
    connect,
    fail,
    me,
    run_async,
    settings_for,
)
from syncworker.config import Settings
from syncworker.control import ControlError, cancel, pause, resume
from syncworker.durations import DurationError, parse_duration, parse_time


@contextlib.asynccontextmanager
async def set_up(settings: Settings) -> AsyncIterator[None]:
    """A database never migrated (or an older schema without the function):
    say what to run, as `status` does, not a traceback."""
    try:
        yield
    except (
        psycopg.errors.UndefinedTable,
        psycopg.errors.InvalidSchemaName,
        psycopg.errors.UndefinedFunction,
    ):
        fail(EX_CONFIG, NOT_SET_UP.format(settings.schema, me()))


ScopeOpt = Annotated[str | None, typer.Option("--scope", "-s", help="Only this scope of the job.")]


def pause_command(
    job: Annotated[str, typer.Argument(help="The job to hold.")],
    scope: ScopeOpt = None,
    for_: Annotated[
        str | None,
        typer.Option("--for", help="Resume by itself after this long: 90s, 30m, 2h, 1d."),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(
            "--until",
            help="Resume by itself at this time (ISO 8601; local unless an offset is given).",
        ),
    ] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Why: shown by status.")] = None,
    by: Annotated[
        str | None,
        typer.Option("--by", help="Recorded as who paused (default: the database user)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the hold as JSON.")] = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Hold a job (or one scope): no run of it starts on any worker until
    `resume`; triggers wait as pending, cron fires are not run."""
    if for_ is not None and until is not None:
        fail(2, "give --for or --until, not both")
    try:
        ends = (
            datetime.now(UTC) + parse_duration(for_)
            if for_ is not None
            else parse_time(until)
            if until is not None
            else None
        )
    except DurationError as exc:
        fail(2, str(exc))
    settings = settings_for(config, database_url, required=False)

    async def go() -> dict[str, object]:
        conn = await connect(settings)
        async with conn, set_up(settings):
            try:
                hold = await pause(
                    conn, job, scope, until=ends, reason=reason, by=by, schema=settings.schema
                )
            except ControlError as exc:
                fail(1, str(exc))
        return {
            "job": hold.job,
            "scope": hold.scope,
            "paused_at": hold.paused_at.isoformat(),
            "paused_by": hold.paused_by,
            "reason": hold.reason,
            "until": hold.until.isoformat() if hold.until else None,
        }

    held = run_async(go)
    if as_json:
        typer.echo(json.dumps(held))
        return
    key = f"{held['job']}/{held['scope']}" if held["scope"] else str(held["job"])
    ends_text = f" until {held['until']}" if held["until"] else " until resumed"
    typer.echo(f"paused {key}{ends_text}")


def resume_command(
    job: Annotated[str, typer.Argument(help="The job to resume.")],
    scope: ScopeOpt = None,
    by: Annotated[
        str | None,
        typer.Option("--by", help="Recorded as who resumed (default: the database user)."),
    ] = None,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Lift a job's (or a scope's) hold: its waiting runs start."""
    settings = settings_for(config, database_url, required=False)

    async def go() -> bool:
        conn = await connect(settings)
        async with conn, set_up(settings):
            try:
                return await resume(conn, job, scope, by=by, schema=settings.schema)
            except ControlError as exc:
                fail(1, str(exc))

    lifted = run_async(go)
    key = f"{job}/{scope}" if scope else job
    typer.echo(f"resumed {key}" if lifted else f"{key} was not paused")


def cancel_command(
    run_id: Annotated[int, typer.Argument(help="The run to cancel.", min=1)],
    reason: Annotated[str | None, typer.Option("--reason", help="Why: in the run's error.")] = None,
    by: Annotated[
        str | None,
        typer.Option("--by", help="Recorded as who cancelled (default: the database user)."),
    ] = None,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Cancel a pending or running run: it ends `cancelled`, never retried."""
    settings = settings_for(config, database_url, required=False)

    async def go() -> str:
        conn = await connect(settings)
        async with conn, set_up(settings):
            try:
                return await cancel(
                    conn,
                    run_id,
                    reason=reason,
                    by=by,
                    events=settings.events_channel,
                    schema=settings.schema,
                )
            except ControlError as exc:
                fail(1, str(exc))

    status = run_async(go)
    if status == "cancelled":
        typer.echo(f"run {run_id} cancelled")
    elif status == "running":
        typer.echo(f"run {run_id}: its worker is stopping it")
    else:
        typer.echo(f"run {run_id} had ended ({status}): nothing changed")


def backfill_command(
    job: Annotated[str, typer.Argument(help="The job whose fires to backfill.")],
    from_: Annotated[
        str,
        typer.Option(
            "--from", help="The window's start, included (ISO 8601; local unless an offset)."
        ),
    ],
    to: Annotated[
        str,
        typer.Option("--to", help="The window's end, included (later than now: now)."),
    ],
    scope: ScopeOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Queue a window of more fires than misfire_limit.")
    ] = False,
    by: Annotated[
        str | None,
        typer.Option("--by", help="Recorded as who backfilled (default: the database user)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was queued as JSON.")] = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Queue one run per fire of JOB's schedule from --from to --to that has
    no run yet (every scope, or --scope); they run oldest first, one at a
    time per key."""
    try:
        start, end = parse_time(from_), parse_time(to)
    except DurationError as exc:
        fail(2, str(exc))
    if start > end:
        fail(2, f"--from {from_} is after --to {to}")
    settings = settings_for(config, database_url, required=False)

    async def go() -> Backfill:
        conn = await connect(settings)
        async with conn, set_up(settings):
            try:
                return await backfill(
                    conn, job, start, end, scope=scope, force=force, by=by, schema=settings.schema
                )
            except ControlError as exc:
                fail(1, str(exc))

    done = run_async(go)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "job": done.job,
                    "fires": [f.isoformat() for f in done.fires],
                    "queued": [
                        {
                            "run_id": r.run_id,
                            "scope": r.scope,
                            "scheduled_for": r.scheduled_for.isoformat(),
                        }
                        for r in done.queued
                    ],
                    "already_ran": done.already_ran,
                }
            )
        )
        return
    if not done.fires:
        typer.echo(f"no fires of {job} from {start.isoformat()} to {end.isoformat()}")
        return
    typer.echo(
        f"queued {len(done.queued)} runs of {job} for {len(done.fires)} fires"
        f" ({done.already_ran} had a run already)"
    )
    for r in done.queued:
        key = f"{job}/{r.scope}" if r.scope else job
        typer.echo(f"  run {r.run_id}  {key}  {r.scheduled_for.astimezone(UTC).isoformat()}")


def register(app: typer.Typer) -> None:
    app.command("pause")(pause_command)
    app.command("resume")(resume_command)
    app.command("cancel")(cancel_command)
    app.command("backfill")(backfill_command)
