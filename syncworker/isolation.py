"""`isolation = "process"`: a callable step run in a child process the
worker can kill.

The child is a fresh interpreter (`python -m syncworker.isolation`, the
equivalent of multiprocessing's spawn, driven by asyncio's subprocess
support so the worker waits on it without a thread). It imports the step by
its dotted path, with the worker's sys.path. The pipes carry JSON lines:

    worker -> child (stdin):  the run's context, then "stop" when a drain starts
    child -> worker (stdout): log lines, counters, total, "observed", and the end

The step's own prints go to stderr (the child moves its stdout there before
anything else runs), so they cannot corrupt the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import IO, Any, cast

import psycopg
from structlog.typing import FilteringBoundLogger

from syncworker import lease, runtime
from syncworker.command import KILL_GRACE
from syncworker.context import StopRequest, SyncContext
from syncworker.counters import Counters
from syncworker.steps import StepFailed

# Longest protocol line read; a step logging more in one line fails the step.
_LINE_LIMIT = 2**22
_LEVELS = ("debug", "info", "warning", "error", "critical")


class ChildFailed(StepFailed):
    """The child ended without its step succeeding; the message says how."""


def process_step(spec: str, database_url: str) -> Callable[[SyncContext], Any]:
    async def run_process(ctx: SyncContext) -> None:
        await run_in_child(spec, ctx, database_url)

    return run_process


async def run_in_child(spec: str, ctx: SyncContext, database_url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncworker.isolation",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=_LINE_LIMIT,
        # Its own process group: a Ctrl-C meant for the worker (a drain)
        # must not kill it, and a kill reaches what it started as well.
        start_new_session=True,
    )
    work = runtime.current()
    if work is not None:
        work.children.add(proc.pid)
    # In a session of its own it goes on while the worker is frozen: the
    # lease watchdog (a process of its own) kills it when the lease lapses.
    token = lease.current.get()
    try:
        watch = token.watch(proc.pid) if token is not None else None
    except OSError as exc:  # no watchdog: do not run unguarded
        _kill_group(proc.pid, signal.SIGKILL)
        raise StepFailed(f"cannot start the lease watchdog: {exc}") from None
    ctx.log.debug("step_process_started", pid=proc.pid)
    assert proc.stdin is not None and proc.stdout is not None
    stop_sent = False
    try:
        proc.stdin.write(_context_line(spec, ctx, database_url))
        stopper = asyncio.create_task(_send_stop(ctx, proc.stdin))
        try:
            outcome = await _read_child(proc.stdout, ctx)
            code = await proc.wait()
        finally:
            stop_sent = stopper.done() and not stopper.cancelled()
            stopper.cancel()
    except asyncio.CancelledError:
        await _halt(proc, stop_sent or ctx.stopping._event.is_set())
        raise
    finally:
        if work is not None:
            work.children.discard(proc.pid)
        _kill_group(proc.pid, signal.SIGKILL)  # whatever it left behind
        if watch is not None:
            watch.release()
        proc.stdin.close()
    _raise_outcome(outcome, code)


def _context_line(spec: str, ctx: SyncContext, database_url: str) -> bytes:
    scheduled = ctx.scheduled_for
    doc = {
        "spec": spec,
        "sys_path": sys.path,
        "database_url": database_url,
        "run_id": ctx.run_id,
        "job": ctx.job,
        "scope": ctx.scope,
        "source": ctx.source,
        "triggered_by": ctx.triggered_by,
        "payload": ctx.payload,
        "attempt": ctx.attempt,
        "scheduled_for": scheduled.isoformat() if scheduled is not None else None,
    }
    return json.dumps(doc).encode() + b"\n"


async def _send_stop(ctx: SyncContext, stdin: asyncio.StreamWriter) -> None:
    event = ctx.stopping._event  # waited on without marking the request seen
    await event.wait()
    with contextlib.suppress(ConnectionError):
        stdin.write(b"stop\n")
        await stdin.drain()


async def _read_child(stdout: asyncio.StreamReader, ctx: SyncContext) -> dict[str, Any] | None:
    """Apply the child's lines to the run's context until its end message
    (returned) or its stdout closes (None: it died first)."""
    while True:
        try:
            line = await stdout.readline()
        except ValueError:  # a line over the limit
            raise ChildFailed("the step's process wrote a line over 4 MiB") from None
        if not line:
            return None
        try:
            msg = json.loads(line)
        except ValueError:
            continue  # not ours: the step wrote to the raw fd 1 somehow
        kind = msg.get("t") if isinstance(msg, dict) else None
        if kind == "error" and msg.get("traceback"):
            ctx.log.warning("step_process_traceback", traceback=str(msg["traceback"])[-8000:])
        if kind in ("done", "error"):
            return cast(dict[str, Any], msg)
        _apply(msg, kind, ctx)


def _apply(msg: dict[str, Any], kind: Any, ctx: SyncContext) -> None:
    if kind == "log":
        level = msg.get("level")
        given = msg.get("fields")
        fields: dict[str, Any] = given if isinstance(given, dict) else {}
        log = getattr(ctx.log, level if level in _LEVELS else "info")
        log(str(msg.get("event")), **fields)
    elif kind == "count":
        with contextlib.suppress(ValueError, TypeError):  # checked in the child already
            ctx.count(**msg["amounts"])
    elif kind == "total":
        with contextlib.suppress(ValueError, TypeError):
            ctx.total(msg["n"])
    elif kind == "observed":
        ctx.stopping.observed = True


def _raise_outcome(outcome: dict[str, Any] | None, code: int) -> None:
    if outcome is not None and outcome["t"] == "done" and code == 0:
        return
    if outcome is not None and outcome["t"] == "error":
        raise ChildFailed(str(outcome.get("error")))
    text = f"exit code {code}"
    if code < 0:
        with contextlib.suppress(ValueError):
            text += f" ({signal.Signals(-code).name})"
    raise ChildFailed(f"the step's process ended before its step did: {text}")


async def _halt(proc: asyncio.subprocess.Process, asked: bool) -> None:
    """SIGTERM, then SIGKILL after KILL_GRACE (as for commands); SIGKILL at once when a drain
    already asked it to stop (its grace was drain_timeout) or another
    cancellation arrives meanwhile."""
    try:
        if not asked:
            _kill_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_GRACE)
    finally:
        _kill_group(proc.pid, signal.SIGKILL)
    # Reaped, never at the cost of a further cancellation.
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(asyncio.shield(proc.wait()), 1.0)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# -- the child's side -------------------------------------------------------------


class _Pipe:
    """The protocol's writing end, shared by the step's threads."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, **msg: Any) -> None:
        line = json.dumps(msg, default=str)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


class _PipeLogger:
    """A structlog-like logger whose lines the worker logs, bound to the run."""

    def __init__(self, pipe: _Pipe, bound: dict[str, Any] | None = None) -> None:
        self._pipe = pipe
        self._bound = bound or {}

    def bind(self, **fields: Any) -> _PipeLogger:
        return _PipeLogger(self._pipe, {**self._bound, **fields})

    def new(self, **fields: Any) -> _PipeLogger:
        return _PipeLogger(self._pipe, fields)

    def _send(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if fields.pop("exc_info", None):
            fields["exception"] = traceback.format_exc()
        self._pipe.send(t="log", level=level, event=str(event), fields={**self._bound, **fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._send("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._send("info", event, fields)

    msg = info

    def warning(self, event: str, **fields: Any) -> None:
        self._send("warning", event, fields)

    warn = warning

    def error(self, event: str, **fields: Any) -> None:
        self._send("error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._send("error", event, {"exc_info": True, **fields})

    def critical(self, event: str, **fields: Any) -> None:
        self._send("critical", event, fields)


class _ChildStop(StopRequest):
    """Tells the worker when the step saw the drain request (the drain rule)."""

    def __init__(self, event: asyncio.Event, pipe: _Pipe) -> None:
        super().__init__(event)
        self._pipe = pipe
        self._told = False

    def _tell(self) -> None:
        if not self._told:
            self._told = True
            self._pipe.send(t="observed")

    def is_set(self) -> bool:
        seen = super().is_set()
        if seen:
            self._tell()
        return seen

    async def wait(self) -> bool:
        await super().wait()
        self._tell()
        return True


class _ChildContext(SyncContext):
    """SyncContext whose counters also reach the worker's run."""

    _pipe: _Pipe
    scheduled_for: datetime | None

    def count(self, **amounts: int) -> None:
        super().count(**amounts)  # raises on a bad name here, in the step
        self._pipe.send(t="count", amounts={k: int(v) for k, v in amounts.items()})

    def total(self, expected: int) -> None:
        super().total(expected)
        self._pipe.send(t="total", n=int(expected))


def _connector(url: str) -> Callable[[], Any]:
    @asynccontextmanager
    async def connect() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            yield conn

    return connect


def _import(spec: str) -> Callable[..., Any]:
    module_name, _, attr_path = spec.partition(":")
    target: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    return cast(Callable[..., Any], target)


def _watch_stdin(stop: asyncio.Event, loops: list[asyncio.AbstractEventLoop]) -> None:
    for line in sys.stdin:
        if line.strip() == "stop":
            if loops:
                loops[0].call_soon_threadsafe(stop.set)
            else:
                stop.set()  # a plain function: nothing waits on it but is_set()
    # The worker is gone (its pipe closed): no one is left to take the outcome.
    os._exit(70)


def child_main() -> None:
    pipe = _Pipe(os.fdopen(os.dup(1), "w"))
    os.dup2(2, 1)  # the step's prints go to stderr, never into the protocol
    doc = json.loads(sys.stdin.readline())
    sys.path[:] = doc["sys_path"]
    stop = asyncio.Event()
    loops: list[asyncio.AbstractEventLoop] = []
    threading.Thread(target=_watch_stdin, args=(stop, loops), daemon=True).start()
    scheduled = doc.get("scheduled_for")
    ctx = _ChildContext(
        run_id=doc["run_id"],
        job=doc["job"],
        scope=doc["scope"],
        source=doc["source"],
        triggered_by=doc["triggered_by"],
        payload=doc["payload"],
        attempt=doc["attempt"],
        log=cast(FilteringBoundLogger, _PipeLogger(pipe)),
        stopping=_ChildStop(stop, pipe),
        _connect=_connector(doc["database_url"]),
        _run_counters=Counters(),
        scheduled_for=None if scheduled is None else datetime.fromisoformat(scheduled),
    )
    ctx._pipe = pipe
    try:
        fn = _import(doc["spec"])
        if inspect.iscoroutinefunction(fn):

            async def main() -> None:
                loops.append(asyncio.get_running_loop())
                await fn(ctx)

            asyncio.run(main())
        else:
            result = fn(ctx)
            if inspect.isawaitable(result):
                asyncio.run(_await(result))
    except SystemExit as exc:
        pipe.send(t="error", error=f"the step called sys.exit({exc.code!r})")
    except BaseException as exc:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        pipe.send(t="error", error=text, traceback=traceback.format_exc())
    else:
        pipe.send(t="done")
    # Not a normal exit: threads the step left behind must not hold it.
    sys.stderr.flush()
    os._exit(0)


async def _await(awaitable: Any) -> None:
    await awaitable


if __name__ == "__main__":
    child_main()
