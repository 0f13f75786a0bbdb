"""Turn each configured step (callable, command or SQL) into one async callable."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from syncworker import lease, runtime
from syncworker.aio import consume
from syncworker.config import CommandStep, ConfigError, JobConfig, SqlStep, StepSpec
from syncworker.context import SyncContext

T = TypeVar("T")
StepFn = Callable[[SyncContext], Awaitable[None]]

_SQL_COUNTED = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "COPY"})


class StepFailed(Exception):
    """A step failed in a way best told by its message alone (no traceback)."""


@dataclass(frozen=True)
class Step:
    name: str
    run: StepFn


def resolve_job_steps(
    job_name: str, job: JobConfig, source: str, database_url: str = ""
) -> list[Step]:
    """Import and wrap every step of a job; a ConfigError names the bad one.

    `database_url` is what an `isolation = "process"` step's child connects to."""
    return [
        _resolve(spec, source, f"jobs.{job_name}.steps[{i}]", job.isolation, database_url)
        for i, spec in enumerate(job.steps)
    ]


def _resolve(spec: StepSpec, source: str, key: str, isolation: str, database_url: str) -> Step:
    if isinstance(spec, CommandStep):
        from syncworker.command import command_step  # it builds on this module

        return Step(name=" ".join(spec.command)[:200], run=command_step(spec))
    if isinstance(spec, SqlStep):
        return Step(name="sql: " + " ".join(spec.sql.split())[:195], run=_sql_step(spec))
    fn = import_callable(spec, source, key)
    if isolation == "process":
        from syncworker.isolation import process_step  # it builds on this module

        return Step(name=spec, run=process_step(spec, database_url))
    return Step(name=spec, run=_callable_step(fn, spec))


def import_callable(spec: str, source: str, key: str) -> Callable[..., Any]:
    module_name, _, attr_path = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(source, key, f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        raise ConfigError(
            source, key, f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise ConfigError(source, key, f"{module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise ConfigError(source, key, f"{spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def _callable_step(fn: Callable[..., Any], name: str) -> StepFn:
    if inspect.iscoroutinefunction(fn):

        async def run_async(ctx: SyncContext) -> None:
            await _run_as_task(fn, ctx, name)

        return run_async

    async def run_sync(ctx: SyncContext) -> None:
        result = await _run_in_thread(fn, ctx, name)
        if inspect.isawaitable(result):
            await _run_as_task(lambda _: result, ctx, name)

    return run_sync


def _exit_failure(exc: SystemExit) -> StepFailed:
    # A step's sys.exit() ends the step, never the worker it runs in.
    return StepFailed(f"the step called sys.exit({exc.code!r})")


async def _run_as_task(fn: Callable[[SyncContext], Any], ctx: SyncContext, name: str) -> None:
    """Run an async step as a task of its own, so that one which swallows
    CancelledError can be abandoned after CANCEL_GRACE: its run's task then
    ends (the run is requeued or failed) while the step's task, still on the
    loop, keeps its slot and tells the worker (runtime.RunWork.on_abandon)."""

    async def guarded() -> None:
        try:
            await fn(ctx)
        except SystemExit as exc:
            raise _exit_failure(exc) from None

    stop = lease.Stop()

    async def fenced() -> None:
        # The lease is checked at every resumption of the step itself, on
        # its own task: the run's task resuming is not the step resuming.
        await lease.guard(guarded(), lease.current.get(), stop)

    inner = asyncio.ensure_future(fenced())
    try:
        await asyncio.wait({inner})
    except asyncio.CancelledError:
        inner.cancel()
        await _grace(inner)
        if inner.done():
            consume(inner)
        else:
            # Thrown into again at each of its resumptions from now on.
            stop.asked = True
            _abandon(ctx, name, "task", _ended_of(inner))
        raise
    inner.result()


async def _grace(inner: asyncio.Future[Any]) -> None:
    """Wait up to CANCEL_GRACE for a cancelled step's task to end. Further
    cancellations do not cut it short: cancel_and_wait() repeats its cancel
    every half second, and the grace is what makes a step's cleanup possible."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + runtime.CANCEL_GRACE
    while not inner.done() and loop.time() < deadline:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({inner}, timeout=deadline - loop.time())


def _ended_of(task: asyncio.Future[Any]) -> asyncio.Future[None]:
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def done(t: asyncio.Future[Any]) -> None:
        consume(t)
        if not ended.done():
            ended.set_result(None)

    task.add_done_callback(done)
    return ended


def _abandon(ctx: SyncContext, name: str, kind: str, ended: asyncio.Future[None]) -> None:
    work = runtime.current()
    reason = work.reason if work is not None else "cancelled"
    ctx.log.warning(
        "step_abandoned",
        reason=reason,
        runtime=kind,
        detail=(
            "its thread cannot be interrupted: the slot stays taken until it ends"
            if kind == "thread"
            else f"it did not end within {runtime.CANCEL_GRACE:g} s of its cancellation"
        ),
    )
    loop = asyncio.get_running_loop()
    since = loop.time()

    def ended_now(_: asyncio.Future[None]) -> None:
        ctx.log.info(
            "abandoned_step_ended",
            runtime=kind,
            seconds_after=round(loop.time() - since, 3),
        )

    ended.add_done_callback(ended_now)
    if work is not None:
        work.abandon(name, kind, ended)


async def _run_in_thread(fn: Callable[..., T], ctx: SyncContext, name: str) -> T:
    """A plain function in a daemon thread; if its await is cancelled the
    thread cannot be, so it is abandoned and holds the run's slot until it
    really ends. Its profile hook raises StepStopped into it from then on,
    at its next Python call or return (a C call that blocks returns first)."""
    stop = lease.Stop()
    result, ended = _start_daemon_thread(fn, ctx, stop=stop)
    try:
        return await result
    except asyncio.CancelledError:
        if not ended.done():
            stop.asked = True
            _abandon(ctx, name, "thread", ended)
        raise


async def run_in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking function in a daemon thread of its own.

    Not the default executor: the interpreter joins those threads at exit, so
    a step stuck in a blocking call would hold a drained worker open. A
    daemon thread is abandoned at exit, and a cancelled await returns at once.
    """
    result, _ = _start_daemon_thread(fn, *args)
    return await result


def _start_daemon_thread(
    fn: Callable[..., T], *args: Any, stop: lease.Stop | None = None
) -> tuple[asyncio.Future[T], asyncio.Future[None]]:
    """Start `fn` in a daemon thread: (its result, set when the thread ends).
    The run's lease, and `stop` once asked, stop it (lease.py)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    ended: asyncio.Future[None] = loop.create_future()
    token = lease.current.get()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            if ok:
                future.set_result(value)
            elif isinstance(value, lease.LeaseLapsed):
                future.cancel()  # the run's self-fence, as for async steps
            else:
                future.set_exception(value)
        if not ended.done():
            ended.set_result(None)

    def target() -> None:
        try:
            if token is not None:
                # Checked in this thread itself, at its next call or return:
                # after a SIGCONT it may run before the loop notices anything.
                token.install_in_thread(stop)
            outcome: tuple[bool, Any] = (True, fn(*args))
        except SystemExit as exc:
            outcome = (False, _exit_failure(exc))
        except BaseException as exc:
            outcome = (False, exc)
        if token is not None:
            # Inline, not a helper or contextlib.suppress: entering a Python
            # function is an event the hook may raise at.
            try:  # noqa: SIM105
                sys.setprofile(None)
            except lease.StepStopped:
                pass  # it fired once more, and Python removed it as it raised
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name=f"syncworker-step-{fn.__name__}", daemon=True).start()
    return future, ended


def _sql_step(spec: SqlStep) -> StepFn:
    query = spec.sql.encode()

    async def run_sql(ctx: SyncContext) -> None:
        params = {
            "scope": ctx.scope,
            "job": ctx.job,
            "run_id": ctx.run_id,
            "payload": Jsonb(ctx.payload),
        }
        changed = 0
        try:
            # Client-side binding: the server's extended protocol takes one
            # statement only, and a step is often several ("DELETE ...;
            # INSERT ..."). Values are still quoted by psycopg, never pasted.
            async with (
                ctx.connection() as conn,
                conn.transaction(),
                psycopg.AsyncClientCursor(conn) as cur,
            ):
                await cur.execute(query, params)
                while True:
                    changed += _rows_changed(cur)
                    if not cur.nextset():
                        break
        except psycopg.Error as exc:
            # Raised after the transaction block: it is rolled back by now.
            raise StepFailed(_sql_error(exc)) from None
        if changed:
            ctx.count(processed=changed)

    return run_sql


def _rows_changed(cur: psycopg.AsyncClientCursor[Any]) -> int:
    # A SELECT's row count is what it returned, not what the step did.
    verb, _, _ = (cur.statusmessage or "").partition(" ")
    return max(cur.rowcount, 0) if verb in _SQL_COUNTED else 0


def _sql_error(exc: psycopg.Error) -> str:
    """The server's own words: message, SQLSTATE, and its detail, hint and context."""
    diag = exc.diag
    if not diag.message_primary:
        return str(exc).strip() or type(exc).__name__  # a client-side failure
    parts = [f"{diag.message_primary} (SQLSTATE {diag.sqlstate})"]
    for label, text in (
        ("DETAIL", diag.message_detail),
        ("HINT", diag.message_hint),
        ("CONTEXT", diag.context),
    ):
        if text:
            parts.append(f"{label}: {text.strip()}")
    return "\n".join(parts)
