"""Turn each configured step (callable, command or SQL) into one async callable."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import os
import signal
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from psycopg.types.json import Jsonb

from syncworker.config import CommandStep, ConfigError, JobConfig, SqlStep, StepSpec
from syncworker.context import SyncContext

T = TypeVar("T")
StepFn = Callable[[SyncContext], Awaitable[None]]
_STDERR_TAIL = 20
_COUNTER_PREFIX = "::syncworker "


class StepFailed(Exception):
    """A step failed in a way best told by its message alone (no traceback)."""


@dataclass(frozen=True)
class Step:
    name: str
    run: StepFn


def resolve_job_steps(job_name: str, job: JobConfig, source: str) -> list[Step]:
    """Import and wrap every step of a job; a ConfigError names the bad one."""
    return [
        _resolve(spec, source, f"jobs.{job_name}.steps[{i}]") for i, spec in enumerate(job.steps)
    ]


def _resolve(spec: StepSpec, source: str, key: str) -> Step:
    if isinstance(spec, CommandStep):
        return Step(name=" ".join(spec.command)[:200], run=_command_step(spec))
    if isinstance(spec, SqlStep):
        return Step(name="sql: " + " ".join(spec.sql.split())[:195], run=_sql_step(spec))
    return Step(name=spec, run=_callable_step(import_callable(spec, source, key)))


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


def _callable_step(fn: Callable[..., Any]) -> StepFn:
    if inspect.iscoroutinefunction(fn):

        async def run_async(ctx: SyncContext) -> None:
            await fn(ctx)

        return run_async

    async def run_sync(ctx: SyncContext) -> None:
        result = await run_in_daemon_thread(fn, ctx)
        if inspect.isawaitable(result):
            await result

    return run_sync


async def run_in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking function in a daemon thread of its own.

    Not the default executor: the interpreter joins those threads at exit, so
    a step stuck in a blocking call would hold a drained worker open. A
    daemon thread is abandoned at exit, and a cancelled await returns at once.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def target() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn(*args))
        except BaseException as exc:
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name=f"syncworker-step-{fn.__name__}", daemon=True).start()
    return await future


def _sql_step(spec: SqlStep) -> StepFn:
    query = spec.sql.encode()

    async def run_sql(ctx: SyncContext) -> None:
        params = {
            "scope": ctx.scope,
            "job": ctx.job,
            "run_id": ctx.run_id,
            "payload": Jsonb(ctx.payload),
        }
        async with ctx.connection() as conn, conn.transaction():
            cur = await conn.execute(query, params)
            if cur.rowcount > 0:
                ctx.count(processed=cur.rowcount)

    return run_sql


def _command_step(spec: CommandStep) -> StepFn:
    async def run_command(ctx: SyncContext) -> None:
        values = {"{scope}": ctx.scope or "", "{job}": ctx.job, "{run_id}": str(ctx.run_id)}
        argv = []
        for arg in spec.command:
            for placeholder, value in values.items():
                arg = arg.replace(placeholder, value)
            argv.append(arg)
        env = {
            **os.environ,
            "SYNCWORKER_RUN_ID": str(ctx.run_id),
            "SYNCWORKER_JOB": ctx.job,
            "SYNCWORKER_SCOPE": ctx.scope or "",
            "SYNCWORKER_SOURCE": ctx.source,
            "SYNCWORKER_TRIGGERED_BY": ctx.triggered_by or "",
            "SYNCWORKER_ATTEMPT": str(ctx.attempt),
            "SYNCWORKER_PAYLOAD": json.dumps(ctx.payload),
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group, signalled as one
            )
        except OSError as exc:
            raise StepFailed(f"cannot start {argv[0]!r}: {exc.strerror}") from None
        tail: deque[str] = deque(maxlen=_STDERR_TAIL)
        assert proc.stdout is not None and proc.stderr is not None
        readers = asyncio.gather(
            _pump(proc.stdout, "stdout", ctx, None), _pump(proc.stderr, "stderr", ctx, tail)
        )
        terminator = asyncio.create_task(_terminate_on_stop(proc, ctx))
        try:
            await readers
            code = await proc.wait()
        except asyncio.CancelledError:
            _signal_group(proc, signal.SIGKILL)
            readers.cancel()
            raise
        finally:
            terminator.cancel()
        if code != 0:
            detail = "\n".join(tail)
            raise StepFailed(f"exit code {code}" + (f": {detail}" if detail else ""))

    return run_command


async def _pump(
    stream: asyncio.StreamReader, name: str, ctx: SyncContext, tail: deque[str] | None
) -> None:
    async for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if line.startswith(_COUNTER_PREFIX):
            _apply_counter_line(line[len(_COUNTER_PREFIX) :], ctx)
            continue
        if tail is not None:
            tail.append(line)
        ctx.log.info("step_output", stream=name, line=line)


def _apply_counter_line(text: str, ctx: SyncContext) -> None:
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        total = doc.pop("total", None)
        if total is not None:
            ctx.total(int(total))
        if doc:
            ctx.count(**{k: int(v) for k, v in doc.items()})
    except (ValueError, TypeError) as exc:
        ctx.log.warning("step_counter_line_ignored", line=text[:200], reason=str(exc))


async def _terminate_on_stop(proc: asyncio.subprocess.Process, ctx: SyncContext) -> None:
    # Waiting marks the request as seen: a command stopped by SIGTERM is redone.
    await ctx.stopping.wait()
    _signal_group(proc, signal.SIGTERM)


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
