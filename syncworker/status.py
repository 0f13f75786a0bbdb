"""Render what `syncworker status` shows: workers, jobs, recent runs, summary."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any


def to_json(status: Mapping[str, Any], *, indent: int | None = 2) -> str:
    return json.dumps(status, default=_jsonable, indent=indent)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        # The log lines' form (UTC, "Z"), whatever the session's TimeZone.
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def render(status: Mapping[str, Any], now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    out: list[str] = []
    out.append("WORKERS")
    out.extend(
        _table(
            ["id", "hostname", "pid", "state", "heartbeat", "current run"],
            [
                [
                    w["id"],
                    w["hostname"],
                    str(w["pid"]),
                    w["state"],
                    _ago(w["heartbeat_at"], now),
                    ", ".join(str(i) for i in (w["current_runs"] or [])) or "-",
                ]
                for w in status["workers"]
            ],
        )
    )
    out.append("")
    out.append("JOBS")
    out.extend(
        _table(
            ["job", "schedule", "scopes", "next fire", "last run", "paused"],
            [
                [
                    j["name"] + ("" if j["enabled"] else " (disabled)"),
                    " | ".join(j["schedule"]) or "-",
                    ",".join(j["scopes"]) if j["scopes"] else "-",
                    _when(j["next_fire_at"], now),
                    f"#{j['last_run_id']} {j['last_status']}" if j["last_run_id"] else "-",
                    _holds(j, now),
                ]
                for j in status["jobs"]
            ],
        )
    )
    out.append("")
    out.append("RECENT RUNS")
    out.extend(
        _table(
            ["id", "job", "scope", "status", "source", "requested", "duration", "records", "error"],
            [
                [
                    str(r["id"]),
                    r["job"],
                    r["scope"] or "-",
                    _run_status(r, now),
                    r["source"],
                    _ago(r["requested_at"], now),
                    f"{r['duration_ms'] / 1000:.1f}s" if r["duration_ms"] is not None else "-",
                    _records(r),
                    (r["error"] or "").splitlines()[0][:60] if r["error"] else "",
                ]
                for r in status["runs"]
            ],
        )
    )
    s = status["summary"]
    out.append("")
    out.append(
        f"total {s.get('total', 0)}  succeeded {s.get('succeeded', 0)}  "
        f"failed {s.get('failed', 0)}  pending {s.get('pending', 0)}  "
        f"running {s.get('running', 0)}  last success {_ago(s.get('last_success_at'), now)}"
    )
    return "\n".join(out)


def _run_status(run: Mapping[str, Any], now: datetime) -> str:
    """A pending run waiting for its not_before (a delayed trigger) says until when."""
    start = run.get("not_before")
    if run["status"] == "pending" and start is not None and start > now:
        return f"pending, starts {_ago(start, now)}"
    return str(run["status"])


def _holds(job: Mapping[str, Any], now: datetime) -> str:
    """The job's holds in force (pause()): by whom, until when, why."""
    holds = []
    if job.get("paused"):
        holds.append(_hold("", job, now))
    for scope in job.get("paused_scopes") or ():
        holds.append(_hold(f"{scope['scope']}: ", scope, now))
    return "; ".join(holds) or "-"


def _hold(prefix: str, hold: Mapping[str, Any], now: datetime) -> str:
    until = hold.get("paused_until")
    if isinstance(until, str):
        until = datetime.fromisoformat(until)  # a scope's hold comes as JSON
    text = f"{prefix}by {_one_line(hold.get('paused_by'))}"
    text += f", until {_when(until, now)}" if until else ""
    reason = hold.get("paused_reason")
    return text + (f" ({_one_line(reason)})" if reason else "")


def _one_line(value: Any) -> str:
    """Operator-written text on one line of the table: no control characters
    (a newline in a reason would draw a row of its own)."""
    return "".join(c if c.isprintable() else " " for c in str(value))


def _records(run: Mapping[str, Any]) -> str:
    done = run["records_processed"]
    total = run["records_total"]
    text = f"{done}/{total}" if total is not None else str(done)
    extra = [
        f"{label}{run[f'records_{name}']}"
        for name, label in (("inserted", "+"), ("updated", "~"), ("deleted", "-"), ("errored", "!"))
        if run[f"records_{name}"]
    ]
    return text + (f" ({' '.join(extra)})" if extra else "")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  " + "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return [line.rstrip() for line in lines]


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    seconds = (now - when).total_seconds()
    return _span(seconds) + " ago" if seconds >= 0 else "in " + _span(-seconds)


def _when(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z ({_ago(when, now)})"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
