"""What `syncworker trigger --wait` shows on stderr while it follows runs.

On a terminal, one line per run, redrawn in place. Anywhere else (a log, a
CI job), one line per change, so the output stays readable as a file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

TERMINAL = ("succeeded", "failed", "cancelled", "skipped")
BAR_WIDTH = 20
# A log gets at most this often a line about one run's progress: workers
# publish it about once a second per run, which many runs would turn into
# a flood.
LINE_EVERY = 1.0


@dataclass
class _Run:
    id: int
    label: str = ""
    status: str = "pending"
    step: str | None = None
    processed: int = 0
    total: int | None = None
    error: str | None = None
    duration_ms: int | None = None
    since: float | None = None
    printed_at: float | None = None
    printed_status: str | None = None
    printed_counts: tuple[int, int | None, str | None] | None = None


def status_line(row: Mapping[str, Any]) -> str:
    """One line about a run row: what a log gets at each status change."""
    scope = f"/{row['scope']}" if row["scope"] else ""
    text = f"run {row['id']} {row['job']}{scope}: {row['status']}"
    if row["records_total"]:
        text += f" {row['records_processed']}/{row['records_total']}"
    elif row["records_processed"]:
        text += f" {row['records_processed']} records"
    if row["error"]:
        text += f" ({row['error'].splitlines()[0][:200]})"
    return text


class ProgressView:
    """Feed it run rows (read at status events) and run_progress payloads. A
    live view draws at `refresh()`, called after each batch of them and now
    and then so its elapsed times move; a log gets its lines at once."""

    def __init__(
        self,
        stream: TextIO,
        ids: Sequence[int],
        *,
        live: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self.live = live
        self._clock = clock
        self._runs = {i: _Run(i) for i in ids}
        self._drawn: list[str] | None = None

    def row(self, row: Mapping[str, Any]) -> None:
        run = self._runs[row["id"]]
        scope = f"/{row['scope']}" if row["scope"] else ""
        run.label = f"{row['job']}{scope}"
        run.step = row["current_step"]
        run.processed = row["records_processed"]
        run.total = row["records_total"]
        run.error = row["error"]
        run.duration_ms = row["duration_ms"]
        self._set_status(run, row["status"])
        if not self.live and run.status != run.printed_status:
            self._print(run, status_line(row))

    def event(self, event: Mapping[str, Any]) -> None:
        """A run_progress payload: its fields are used as they are, with no
        read of the row, since they are as fresh as the row itself."""
        run = self._runs.get(event["run_id"])
        if run is None or run.status in TERMINAL:
            return  # a late event must not bring a finished run back
        if not run.label:
            scope = f"/{event['scope']}" if event.get("scope") else ""
            run.label = f"{event['job']}{scope}"
        run.step = event.get("step")
        run.processed = int(event.get("records_processed") or 0)
        total = event.get("records_total")
        run.total = None if total is None else int(total)
        self._set_status(run, str(event.get("status") or run.status))
        if self.live:
            return
        now = self._clock()
        due = run.printed_at is None or now - run.printed_at >= LINE_EVERY
        counts = (run.processed, run.total, run.step)
        if due and counts != run.printed_counts:
            run.printed_counts = counts
            step = f" step {run.step}" if run.step else ""
            self._print(run, f"run {run.id} {run.label}: {run.status} {self._counts(run)}{step}")

    def refresh(self) -> None:
        if self.live:
            self._draw()

    def close(self) -> None:
        if self.live and self._drawn is not None:
            self._draw()
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = None

    def _set_status(self, run: _Run, status: str) -> None:
        if status == "running" and run.since is None:
            run.since = self._clock()
        run.status = status

    def _print(self, run: _Run, text: str) -> None:
        run.printed_at = self._clock()
        run.printed_status = run.status
        self._stream.write(text + "\n")
        self._stream.flush()

    def _counts(self, run: _Run) -> str:
        if run.total is not None:
            return f"{run.processed}/{run.total}"
        return f"{run.processed} records"

    def _line(self, run: _Run) -> str:
        head = f"run {run.id} {run.label or '?'}"
        if run.status == "pending":
            return f"{head}  pending"
        parts = [head]
        if run.status == "running":
            if run.total:
                done = min(max(run.processed / run.total, 0.0), 1.0)
                filled = round(done * BAR_WIDTH)
                parts.append("[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]")
            if run.total is not None or run.processed:
                parts.append(self._counts(run))
            else:
                parts.append("running")
            if run.step:
                parts.append(f"step {run.step}")
            if run.since is not None:
                parts.append(f"{self._clock() - run.since:.1f}s")
        else:
            parts.append(run.status)
            if run.total is not None or run.processed:
                parts.append(self._counts(run))
            if run.duration_ms is not None:
                parts.append(f"{run.duration_ms / 1000:.1f}s")
            if run.error:
                parts.append(f"({run.error.splitlines()[0]})")
        return "  ".join(parts)

    def _draw(self) -> None:
        width = _columns(self._stream) - 1  # the last column would wrap on some terminals
        lines = [self._line(run)[:width] for run in self._runs.values()]
        if lines == self._drawn:
            return
        # Back to the first line of the block drawn last time, then each line
        # rewritten from its start and cleared to its end.
        up = f"\x1b[{len(lines) - 1}A" if self._drawn is not None and len(lines) > 1 else ""
        self._stream.write(up + "\n".join(f"\r{line}\x1b[K" for line in lines))
        self._stream.flush()
        self._drawn = lines


def _columns(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    # A fresh pseudo-terminal reports 0 columns until someone sets a size.
    return columns if columns > 0 else 80
