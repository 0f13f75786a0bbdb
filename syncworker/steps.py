"""Turn each configured step (callable, command or SQL) into one async callable."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import os
import re
import signal
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from syncworker import lease, runtime
from syncworker.config import CommandStep, ConfigError, JobConfig, SqlStep, StepSpec
from syncworker.context import SyncContext
from syncworker.counters import COUNTERS

T = TypeVar("T")
StepFn = Callable[[SyncContext], Awaitable[None]]

# Seconds a command gets between SIGTERM and SIGKILL when the job's timeout
# (or anything but a drain) ends it. A drain sends SIGTERM when it starts, so
# there `drain_timeout` is the grace. Long enough to close files and roll
# back, short enough that a hung command cannot stretch a timeout much.
KILL_GRACE = 5.0
_STDERR_TAIL = 20
# Of the error column's budget, what the stderr tail may take: the last
# lines are the telling ones, so it is cut from the front.
_TAIL_CHARS = 3000
# Longest output line kept whole; the rest of a longer line is dropped, so a
# command writing megabytes without a newline cannot swell the logs or memory.
_LINE_LIMIT = 8192
_READ_CHUNK = 65536
_COUNTER_LINE = re.compile(r"::syncworker(?:\s+(.*))?")
# Counter values stay exact in JSON readers and far from bigint overflow.
_COUNTER_MAX = 2**53
_PLACEHOLDER = re.compile(r"\{(scope|job|run_id)\}")
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
        return Step(name=" ".join(spec.command)[:200], run=_command_step(spec))
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
            _consume(inner)
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
        _consume(t)
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


# The largest payload also put in the environment (SYNCWORKER_PAYLOAD):
# Linux refuses to start a program with any one environment string over
# 128 KiB (MAX_ARG_STRLEN), with "Argument list too long". Past this, a
# command reads SYNCWORKER_PAYLOAD_FILE, which it always gets.
PAYLOAD_IN_ENV_MAX = 64 * 1024


@contextlib.contextmanager
def _payload_file(payload: str) -> Iterator[str]:
    """The payload in a file only this user may read, removed afterwards."""
    fd, path = tempfile.mkstemp(prefix="syncworker-payload-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(payload)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _command_step(spec: CommandStep) -> StepFn:
    async def run_command(ctx: SyncContext) -> None:
        payload = json.dumps(ctx.payload)
        with _payload_file(payload) as payload_path:
            await _run_command(spec, ctx, payload, payload_path)

    return run_command


async def _run_command(
    spec: CommandStep, ctx: SyncContext, payload: str, payload_path: str
) -> None:
    argv = substitute(spec.command, ctx)
    env = {
        **os.environ,
        "SYNCWORKER_RUN_ID": str(ctx.run_id),
        "SYNCWORKER_JOB": ctx.job,
        "SYNCWORKER_SCOPE": ctx.scope or "",
        "SYNCWORKER_SOURCE": ctx.source,
        "SYNCWORKER_TRIGGERED_BY": ctx.triggered_by or "",
        "SYNCWORKER_ATTEMPT": str(ctx.attempt),
        "SYNCWORKER_PAYLOAD_FILE": payload_path,
    }
    if len(payload.encode()) <= PAYLOAD_IN_ENV_MAX:
        env["SYNCWORKER_PAYLOAD"] = payload
    # A drain already under way when the command starts is no request
    # to stop it: like a step that never looks at `stopping`, it runs on
    # (the drain rule) until drain_timeout cancels it.
    started_in_drain = ctx.stopping.requested()
    try:
        proc, exited = await _spawn(argv, env)
    except OSError as exc:
        raise StepFailed(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
    group = _Group(proc)
    token = lease.current.get()
    # Its own session keeps it running while the worker is frozen: the
    # lease watchdog, a process of its own, kills it when the lease lapses.
    try:
        watch = token.watch(group.pgid) if token is not None else None
    except OSError as exc:  # no watchdog process: do not run unguarded
        group.signal(signal.SIGKILL)
        raise StepFailed(f"cannot start the lease watchdog: {exc}") from None
    tail: deque[str] = deque(maxlen=_STDERR_TAIL)
    assert proc.stdout is not None and proc.stderr is not None
    readers = asyncio.gather(
        _pump(proc.stdout, "stdout", ctx, None), _pump(proc.stderr, "stderr", ctx, tail)
    )
    readers.add_done_callback(_consume)
    terminator = asyncio.create_task(_terminate_on_stop(group, ctx, started_in_drain))
    try:
        await asyncio.shield(exited)
        # A drain starting from now on did not cut it short: not seen.
        terminator.cancel()
        code = proc.returncode
        assert code is not None
        stopped = group.terminated  # by the drain, while it ran
        # Whatever it left running in its group would outlive the step as
        # an orphan, and would hold the output pipes open.
        group.signal(signal.SIGTERM)
        await asyncio.wait({readers}, timeout=KILL_GRACE)
        group.signal(signal.SIGKILL)
        # Only a process that left the group (setsid) can still hold a
        # pipe now; its output is not worth hanging the run for.
        await asyncio.wait({readers}, timeout=1.0)
        if not readers.done():
            readers.cancel()
            ctx.log.warning("step_output_abandoned", reason="output still open after exit")
    except asyncio.CancelledError:
        try:
            await _halt(group, exited, readers)
        finally:
            readers.cancel()
        raise
    finally:
        terminator.cancel()
        if watch is not None:
            watch.release()
    if stopped:
        # Even after a clean exit: it was cut short, so the run is redone
        # and the step recorded as stopped (see the README's drain rule).
        raise StepFailed(f"stopped by shutdown ({_exit_error(code, tail)})")
    if code != 0:
        raise StepFailed(_exit_error(code, tail))


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Tells when the process itself exits. Process.wait() waits for its
    output pipes to close as well, which a child left in the background
    holds open for as long as it lives."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


async def _spawn(
    argv: list[str], env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, asyncio.Future[None]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _Protocol(limit=_READ_CHUNK, loop=loop),
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group, signalled as one
    )
    return asyncio.subprocess.Process(transport, protocol, loop), protocol.exited


def substitute(args: Sequence[str], ctx: SyncContext) -> list[str]:
    """Replace `{scope}`, `{job}` and `{run_id}` in one pass, so a value that
    itself contains a placeholder arrives verbatim."""
    values = {"scope": ctx.scope or "", "job": ctx.job, "run_id": str(ctx.run_id)}
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in args]


class _Group:
    """A command's process group. Its id stays valid after the leader exits
    for as long as anything it started is still in it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.pgid = proc.pid
        self.terminated = False

    def signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGTERM:
            self.terminated = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)


async def _halt(group: _Group, exited: asyncio.Future[None], readers: asyncio.Future[Any]) -> None:
    """Stop a command whose step is cancelled: SIGTERM, then SIGKILL after
    KILL_GRACE, or at once when a drain already sent the SIGTERM (its grace
    was `drain_timeout`) or another cancellation arrives meanwhile."""
    try:
        if not group.terminated:
            group.signal(signal.SIGTERM)
            await asyncio.wait({exited}, timeout=KILL_GRACE)
    finally:
        # Even when the leader is gone: its children are in the group too.
        group.signal(signal.SIGKILL)
    # Reaped rather than left a zombie, and its last words (what it logged
    # on SIGTERM) read, but never at the cost of a further cancellation.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait({exited, readers}, timeout=1.0, return_when=asyncio.ALL_COMPLETED)


def _consume(future: asyncio.Future[Any]) -> None:
    # The readers' outcome is awaited on success only; never warn about it.
    if not future.cancelled():
        future.exception()


def _exit_error(code: int, tail: deque[str]) -> str:
    text = f"exit code {code}"
    if code < 0:
        with contextlib.suppress(ValueError):
            text += f" ({signal.Signals(-code).name})"
    detail = "\n".join(tail)
    if len(detail) > _TAIL_CHARS:
        detail = "..." + detail[-_TAIL_CHARS:]
    return text + (f": {detail}" if detail else "")


async def _pump(
    stream: asyncio.StreamReader, name: str, ctx: SyncContext, tail: deque[str] | None
) -> None:
    """Log each line of one output stream, reading in chunks: StreamReader's
    line reader raises on a line over its 64 KiB limit."""
    line = bytearray()
    cut = False
    while chunk := await stream.read(_READ_CHUNK):
        pieces = chunk.split(b"\n")
        for piece in pieces[:-1]:
            line += piece
            _emit(bytes(line[:_LINE_LIMIT]), cut or len(line) > _LINE_LIMIT, name, ctx, tail)
            line.clear()
            cut = False
        line += pieces[-1]
        if len(line) > _LINE_LIMIT:
            del line[_LINE_LIMIT:]
            cut = True
    if line or cut:
        _emit(bytes(line), cut, name, ctx, tail)


def _emit(raw: bytes, cut: bool, name: str, ctx: SyncContext, tail: deque[str] | None) -> None:
    line = raw.decode("utf-8", "replace").rstrip("\r")
    match = _COUNTER_LINE.fullmatch(line)
    if match:
        _apply_counter_line(match.group(1) or "", ctx)
        return
    if tail is not None:
        tail.append(line)
    if cut:
        ctx.log.info("step_output", stream=name, line=line, truncated=True)
    else:
        ctx.log.info("step_output", stream=name, line=line)


def _apply_counter_line(text: str, ctx: SyncContext) -> None:
    """`{"inserted": 10, "total": 500}`: counters added, total set. All or
    nothing: a line with one bad entry changes no counter."""
    reason = None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        doc, reason = None, f"not JSON: {exc}"
    if reason is None and not isinstance(doc, dict):
        reason = "not a JSON object"
    if reason is None:
        assert isinstance(doc, dict)
        for key, value in doc.items():
            if key != "total" and key not in COUNTERS:
                reason = f"unknown counter {key!r}; use total, {', '.join(COUNTERS)}"
            elif type(value) is not int or not 0 <= value < _COUNTER_MAX:
                reason = f"{key} must be a whole number from 0 to 2**53 - 1"
            if reason:
                break
    if reason is not None:
        ctx.log.warning("step_counter_line_ignored", line=text[:200], reason=reason)
        return
    total = doc.pop("total", None)
    if total is not None:
        ctx.total(total)
    if doc:
        ctx.count(**doc)


async def _terminate_on_stop(group: _Group, ctx: SyncContext, started_in_drain: bool) -> None:
    if started_in_drain:
        return
    # Waiting marks the request as seen: a command stopped by SIGTERM is redone.
    await ctx.stopping.wait()
    group.signal(signal.SIGTERM)
