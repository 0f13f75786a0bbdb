"""The wire formats of syncworker's notifications, defined once.

Published by the SQL side (trigger() in db/sql; the run statements in
store.py), read here. tests/daemon/test_event_contract.py holds the two
together: it makes the database publish each kind and parses it with these.

- The trigger channel (`channel`, default `sync_trigger`): a job name, or
  a JSON request (triggers.py parses it; SPEC "Payloads").
- The wake channel (`<schema>_wake`): a job name (a run of it is pending),
  a reservation, `{"reserved_for": <worker id>, "id": <run id>}`, a hold
  that changed, `{"pause": <job>}` (pause(), resume()): workers re-read when
  the next hold ends, a delayed run, `{"delayed": <job>}` (trigger() with a
  delay): workers re-read when the soonest delayed run may start, or a
  cancel, `{"cancel": <run id>}` (cancel()): the run's owner confirms it
  from cancels and stops the run.
  Nothing else: the channel can be LISTENed to by any role, so it carries
  neither scopes nor payloads. A reservation is only a hint of which run to
  claim (any role may NOTIFY any channel): the claim decides.
- The events channel (`events_channel`, default `sync_events`): one JSON
  object per run event, `{event, run_id, job, scope, status}`, and for
  `run_progress` also `step`, `records_processed`, `records_total`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# The run events the database publishes (the `event` field).
RUN_EVENTS = (
    "run_started",
    "run_progress",
    "run_succeeded",
    "run_failed",
    "run_cancelled",
)


def is_reservation(payload: str) -> bool:
    """Wake notifications carry a job name, or a reservation (or a hold
    change) as a JSON object."""
    return payload.startswith("{")


def is_hold_change(payload: str) -> bool:
    """A wake saying a hold was made, changed or lifted. A hint like the
    others (any role may send one): it only makes workers re-read."""
    if not payload.startswith('{"pause"'):
        return False
    try:
        data = json.loads(payload)
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("pause"), str)


def is_delay(payload: str) -> bool:
    """A wake saying a run now waits for its not_before (trigger() with a
    delay). A hint: it only makes workers re-read when the next may start."""
    if not payload.startswith('{"delayed"'):
        return False
    try:
        data = json.loads(payload)
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("delayed"), str)


def reserved_run_id(payload: str, worker_id: str) -> int | None:
    """The run id a reservation notification names for this worker; None if
    it names another worker or cannot be read. Only a hint of which run to
    try to claim: the claim checks everything against the row."""
    try:
        data = json.loads(payload)
        if not isinstance(data, dict) or data.get("reserved_for") != worker_id:
            return None
        run_id = data.get("id")
        if isinstance(run_id, bool) or not isinstance(run_id, int) or run_id <= 0:
            return None
        return run_id
    except ValueError:
        return None


def cancelled_run_id(payload: str) -> int | None:
    """The run a cancel wake names; None if it is not one. A hint: the
    owner stops the run only once the database has the request."""
    if not payload.startswith('{"cancel"'):
        return None
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    run_id = data.get("cancel") if isinstance(data, dict) else None
    if isinstance(run_id, bool) or not isinstance(run_id, int) or run_id <= 0:
        return None
    return run_id


@dataclass(frozen=True)
class RunEvent:
    """One notification on the events channel."""

    event: str
    run_id: int
    job: str
    scope: str | None
    status: str
    step: str | None = None
    records_processed: int | None = None
    records_total: int | None = None


def parse_run_event(payload: str) -> RunEvent | None:
    """The event a payload on the events channel carries; None if it is not
    one (any role may NOTIFY the channel: followers skip what they cannot read)."""
    try:
        data: Any = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    event, run_id, job = data.get("event"), data.get("run_id"), data.get("job")
    status, scope = data.get("status"), data.get("scope")
    if not (
        isinstance(event, str)
        and isinstance(run_id, int)
        and not isinstance(run_id, bool)
        and isinstance(job, str)
        and isinstance(status, str)
        and (scope is None or isinstance(scope, str))
    ):
        return None
    step = data.get("step")
    processed, total = data.get("records_processed"), data.get("records_total")
    return RunEvent(
        event,
        run_id,
        job,
        scope,
        status,
        step if isinstance(step, str) else None,
        processed if isinstance(processed, int) else None,
        total if isinstance(total, int) else None,
    )
