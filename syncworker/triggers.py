"""NOTIFY payload -> trigger requests, or a rejection that says why.

Pure: no I/O. The worker logs `trigger_rejected` with `reason` for every
Rejected, and hands every TriggerRequest to the store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from syncworker.durations import MAX_DURATION

# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; anything larger
# reaching us came from somewhere else and is refused on principle.
MAX_PAYLOAD_BYTES = 8000
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")
_TEXT_LIMIT = 200
_RESERVED = frozenset({"job", "scope", "scopes", "source", "triggered_by", "run_after"})
# The longest delay a trigger may ask for, as for pauses (durations.py).
MAX_RUN_AFTER = MAX_DURATION.total_seconds()
# Deeper JSON is refused before it reaches code that recurses over it.
MAX_DEPTH = 100


@dataclass(frozen=True)
class JobInfo:
    """What trigger validation needs to know of a job."""

    enabled: bool
    scopes: tuple[str, ...] | None  # None: the job has no scopes


@dataclass(frozen=True)
class TriggerRequest:
    job: str
    scope: str | None
    source: str = "notify"
    triggered_by: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)
    # Seconds before the run may start (trigger()'s run_after); None: now.
    run_after: float | None = None


@dataclass(frozen=True)
class Rejected:
    reason: str


def parse_notification(raw: str, jobs: Mapping[str, JobInfo]) -> list[TriggerRequest] | Rejected:
    """Turn one NOTIFY payload into the runs it asks for, or say why not."""
    if len(raw.encode("utf-8", "surrogatepass")) >= MAX_PAYLOAD_BYTES:
        return Rejected(f"payload too large (limit {MAX_PAYLOAD_BYTES} bytes)")
    text = raw.strip()
    if text in ("", "{}"):
        return [
            TriggerRequest(job=name, scope=scope)
            for name, info in sorted(jobs.items())
            if info.enabled
            for scope in _all_scopes(info)
        ]
    if text.startswith("{"):
        try:
            doc = json.loads(text, parse_constant=_no_constants, parse_float=_finite)
        except (ValueError, RecursionError) as exc:
            return Rejected(f"invalid JSON: {exc}")
        if not isinstance(doc, dict):
            return Rejected("JSON payload must be an object")
        unstorable = _unstorable(doc)
        if unstorable:
            return Rejected(unstorable)
        return _from_object(doc, jobs)
    if text[0] in '["' or text in ("true", "false", "null"):
        return Rejected("JSON payload must be an object")
    if not _NAME.match(text):
        return Rejected("payload is neither JSON nor a job name")
    return request_runs(text, None, jobs)


def request_runs(
    job: str,
    scopes: list[str] | None,
    jobs: Mapping[str, JobInfo],
    *,
    source: str = "notify",
    triggered_by: str | None = None,
    payload: Mapping[str, Any] | None = None,
    run_after: float | None = None,
) -> list[TriggerRequest] | Rejected:
    """Validate a job and its scopes against the configured jobs."""
    info = jobs.get(job)
    if info is None:
        return Rejected(f"unknown job {_show(job)}")
    if not info.enabled:
        return Rejected(f"job {_show(job)} is disabled")
    if scopes is not None and info.scopes is None:
        return Rejected(f"job {_show(job)} has no scopes, but scope was given")
    if info.scopes is not None and scopes is not None:
        unknown = [s for s in scopes if s not in info.scopes]
        if unknown:
            return Rejected(f"unknown scope {_show(unknown[0])} for job {_show(job)}")
    chosen = list(dict.fromkeys(scopes)) if scopes is not None else list(_all_scopes(info))
    return [
        TriggerRequest(
            job=job,
            scope=scope,
            source=source,
            triggered_by=triggered_by,
            payload=dict(payload or {}),
            run_after=run_after,
        )
        for scope in chosen
    ]


def _from_object(
    doc: dict[str, Any], jobs: Mapping[str, JobInfo]
) -> list[TriggerRequest] | Rejected:
    job = doc.get("job")
    if job is None:
        if doc.get("scope") is not None or doc.get("scopes") is not None:
            return Rejected("a scope was given without 'job'")
    elif not isinstance(job, str) or not job:
        return Rejected("field 'job' must be a non-empty string")

    if "scope" in doc and "scopes" in doc:
        return Rejected("give either 'scope' or 'scopes', not both")
    scopes: list[str] | None = None
    if "scope" in doc and doc["scope"] is not None:
        if not isinstance(doc["scope"], str) or not doc["scope"]:
            return Rejected("field 'scope' must be a non-empty string")
        scopes = [doc["scope"]]
    if "scopes" in doc and doc["scopes"] is not None:
        raw = doc["scopes"]
        if not isinstance(raw, list) or not raw or not all(isinstance(s, str) and s for s in raw):
            return Rejected("field 'scopes' must be a non-empty list of strings")
        scopes = raw

    texts: dict[str, str | None] = {}
    for key in ("source", "triggered_by"):
        value = doc.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > _TEXT_LIMIT):
            return Rejected(f"field {key!r} must be a string of at most {_TEXT_LIMIT} characters")
        texts[key] = value

    if texts["source"] == "backfill":
        # trigger() refuses it too: backfill runs queue apart, one per fire.
        return Rejected("source 'backfill' is reserved for backfill()")
    run_after = doc.get("run_after")
    if run_after is not None and (
        isinstance(run_after, bool)
        or not isinstance(run_after, int | float)
        or not 0 <= run_after <= MAX_RUN_AFTER
    ):
        return Rejected(
            f"field 'run_after' must be a number of seconds from 0 to {MAX_RUN_AFTER:.0f}"
        )
    delay = float(run_after) if run_after else None

    payload = {k: v for k, v in doc.items() if k not in _RESERVED}
    source = texts["source"] or "notify"
    if job is None:
        # {"source": "api", ...}: every enabled job and scope, like an empty payload.
        return [
            TriggerRequest(
                job=name,
                scope=scope,
                source=source,
                triggered_by=texts["triggered_by"],
                payload=payload,
                run_after=delay,
            )
            for name, info in sorted(jobs.items())
            if info.enabled
            for scope in _all_scopes(info)
        ]
    return request_runs(
        job,
        scopes,
        jobs,
        source=source,
        triggered_by=texts["triggered_by"],
        payload=payload,
        run_after=delay,
    )


def _unstorable(doc: Any) -> str | None:
    """Why PostgreSQL could not store this JSON as jsonb or text, if it cannot.

    Iterative, so that depth cannot exhaust the stack here either.
    """
    pending: list[tuple[Any, int]] = [(doc, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict | list) and depth > MAX_DEPTH:
            return f"JSON nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            pending.extend((k, depth) for k in value)
            pending.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            pending.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            if "\x00" in value:
                return "JSON text contains a NUL character (\\u0000)"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "JSON text contains an unpaired surrogate escape"
    return None


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_constants(name: str) -> Any:
    # NaN and Infinity are not JSON; PostgreSQL's jsonb would refuse them later.
    raise ValueError(f"{name} is not valid JSON")


def _all_scopes(info: JobInfo) -> tuple[str | None, ...]:
    return info.scopes if info.scopes is not None else (None,)


def _show(value: str) -> str:
    """Quote a user-supplied name for a log line without letting it flood it."""
    return repr(value if len(value) <= 80 else value[:80] + "...")
