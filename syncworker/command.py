"""A command step: the child's own process group, its payload, its output
(logged line by line, counter lines applied), its exit, and its stop
(SIGTERM, then SIGKILL after KILL_GRACE, the whole group).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from syncworker import lease
from syncworker.aio import consume
from syncworker.config import CommandStep
from syncworker.context import SyncContext
from syncworker.counters import COUNTERS
from syncworker.steps import StepFailed, StepFn

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


def command_step(spec: CommandStep) -> StepFn:
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
        # The cron fire's time (ISO 8601), empty for a trigger.
        "SYNCWORKER_SCHEDULED_FOR": ctx.scheduled_for.isoformat() if ctx.scheduled_for else "",
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
    readers.add_done_callback(consume)
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
