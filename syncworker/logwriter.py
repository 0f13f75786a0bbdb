"""Where log lines go: a bounded queue drained by one thread per stream.

A log call must never stop the worker. Written in the calling thread, a
line to a closed pipe raises (BrokenPipeError on every call once a `| tee`
or a log shipper went away), and a line to a full pipe blocks the event
loop, and with it every run's writes and the heartbeat. So a call only puts
its line in a queue; a daemon thread writes the queue out. When the stream
is closed, full for long enough that the queue fills, or raises, lines are
dropped and counted (`lost`), and the worker goes on.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import threading
import time
from typing import TextIO

# Lines held while the stream does not keep up: a few MiB at most, some
# seconds of a busy worker's output.
QUEUE_LINES = 10_000
# How long the exit waits for queued lines to be written.
FLUSH_AT_EXIT = 2.0

_lock = threading.Lock()
_writers: dict[int, LineWriter | MemoryWriter] = {}


class MemoryWriter:
    """For a stream with no file behind it (a StringIO): it can neither block
    nor break a pipe, so lines are written at once, in the caller's thread."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lost = 0

    def msg(self, message: str) -> None:
        try:
            self.stream.write(message + "\n")
        except (OSError, ValueError):
            self.lost += 1

    debug = info = warning = warn = error = critical = exception = fatal = log = failure = msg

    def flush(self, timeout: float) -> bool:
        return True


class LineWriter:
    """structlog's logger protocol (`msg` and the level names) over a queue."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lost = 0
        # Written to the file descriptor itself: a TextIO would keep what a
        # broken pipe refused in its buffer, and Python's exit, flushing it
        # again, would fail and turn the exit code into 120.
        self._fd = stream.fileno()
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        with contextlib.suppress(OSError, ValueError):
            stream.flush()  # what was written before goes first
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._queued = 0
        self._count = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._drain, name="syncworker-log", daemon=True)
        self._thread.start()

    def msg(self, message: str) -> None:
        # Counted under a lock: log calls come from several threads (steps'),
        # and a lost update would creep up until every line was dropped.
        with self._count:
            if self._queued >= QUEUE_LINES:
                self.lost += 1
                return
            self._queued += 1
            self._idle.clear()
        self._queue.put(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = failure = msg

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` for the queued lines to be written."""
        return self._idle.wait(timeout)

    def _drain(self) -> None:
        while True:
            line = self._queue.get()
            batch = [line]
            while True:  # what else is queued goes out in the same write
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(("\n".join(batch) + "\n").encode(self._encoding, "backslashreplace"))
            except (OSError, ValueError):
                # Closed (ValueError: I/O on a closed file) or broken: these
                # lines are gone; the next ones are tried again.
                with self._count:
                    self.lost += len(batch)
            with self._count:
                self._queued -= len(batch)
                if self._queued <= 0:
                    self._idle.set()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]


def writer_for(stream: TextIO) -> LineWriter | MemoryWriter:
    """The one writer of `stream` (its thread is shared by every logger on it)."""
    with _lock:
        found = _writers.get(id(stream))
        if found is None or found.stream is not stream:
            found = _writers[id(stream)] = (
                LineWriter(stream) if _has_file(stream) else MemoryWriter(stream)
            )
        return found


def _has_file(stream: TextIO) -> bool:
    try:
        stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return False
    return True


def lost_lines() -> int:
    """Log lines dropped so far, across this process's writers."""
    with _lock:
        return sum(w.lost for w in _writers.values())


def flush_all(timeout: float = FLUSH_AT_EXIT) -> None:
    deadline = time.monotonic() + timeout
    with _lock:
        writers = list(_writers.values())
    for w in writers:
        w.flush(max(0.0, deadline - time.monotonic()))


atexit.register(flush_all)
