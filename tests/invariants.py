"""The guarantees, read back from the tables after a fault test.

Each check returns nothing and raises AssertionError naming what was broken,
with the offending rows, so a failing fault test says which guarantee fell.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from tests.harness import query

Key = tuple[str, str | None]


def assert_invariants(
    url: str,
    *,
    last_trigger: Mapping[Key, int] | None = None,
    pending_ok: bool = False,
) -> None:
    """Every guarantee that can be read from syncworker.runs and test_log,
    once the workers are stopped or idle: nothing is left `running`.

    `last_trigger`: per key, the run id the last durable trigger of that key
    returned; a run of the key must have started (and ended) after it.
    `pending_ok`: runs may still wait (a cron fire after the last claim, or a
    backlog with every worker stopped).
    """
    statuses = ("running",) if pending_ok else ("pending", "running")
    left = query(
        url,
        "SELECT id, job, scope, status, worker_id FROM syncworker.runs"
        " WHERE status = ANY(%s) ORDER BY id",
        (list(statuses),),
    )
    assert left == [], f"runs left {' or '.join(statuses)}: {left}"
    dup_pending = query(
        url,
        # Backfill runs wait one per fire (SPEC "Backfill").
        "SELECT job, scope, count(*) FROM syncworker.runs"
        " WHERE status = 'pending' AND source <> 'backfill'"
        " GROUP BY 1, 2 HAVING count(*) > 1",
    )
    assert dup_pending == [], f"more than one pending run per key: {dup_pending}"
    dup_cron = query(
        url,
        "SELECT job, scope, scheduled_for, count(*) FROM syncworker.runs"
        " WHERE scheduled_for IS NOT NULL GROUP BY 1, 2, 3 HAVING count(*) > 1",
    )
    assert dup_cron == [], f"a cron fire ran more than once: {dup_cron}"
    # Sorted by start within a key, each interval must begin after every
    # earlier one ended (a running max, so this stays linear on big soaks).
    overlaps = query(
        url,
        "SELECT id, job, scope, status, started_at, finished_at, before, worker_id,"
        " attempt, error FROM ("
        "  SELECT id, job, scope, status, started_at, finished_at, worker_id, attempt, error,"
        "  max(finished_at) OVER ("
        "    PARTITION BY job, scope ORDER BY started_at, id"
        "    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before"
        "  FROM syncworker.runs WHERE started_at IS NOT NULL"
        "  AND status NOT IN ('pending', 'skipped')) r"
        " WHERE started_at < before",
    )
    assert overlaps == [], f"two runs of one key overlapped: {overlaps}"
    executions = query(
        url,
        "WITH spans AS ("
        "  SELECT run_id, attempt, job, scope,"
        "         min(at) FILTER (WHERE step = 'span_start') AS t0,"
        "         min(at) FILTER (WHERE step = 'span_end') AS t1"
        "  FROM test_log WHERE step IN ('span_start', 'span_end')"
        "  GROUP BY run_id, attempt, job, scope)"
        " SELECT run_id, job, scope FROM ("
        "  SELECT run_id, job, scope, t0, max(t1) OVER ("
        "    PARTITION BY job, scope ORDER BY t0, run_id"
        "    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before"
        "  FROM spans WHERE t1 IS NOT NULL) x"
        " WHERE t0 < before",
    )
    assert executions == [], f"steps of one key executed at the same time: {executions}"
    for (job, scope), run_id in (last_trigger or {}).items():
        # Runs of a key start in id order, so a run at or after the trigger's
        # own run id started after the trigger; failed counts (retries spent).
        done = query(
            url,
            "SELECT id, status FROM syncworker.runs WHERE job = %s"
            " AND scope IS NOT DISTINCT FROM %s AND id >= %s"
            " AND status IN ('succeeded', 'failed') AND started_at IS NOT NULL",
            (job, scope, run_id),
        )
        assert done, f"trigger of {job}/{scope} (run {run_id}) lost: no run after it"


def trigger(url: str, job: str, scope: str | None = None, **payload: object) -> int:
    """A durable trigger of one key; returns the run id it created or joined."""
    [(run_id, _)] = query(
        url,
        "SELECT * FROM syncworker.trigger(%s, %s, 'test', NULL, %s::jsonb)",
        (job, scope, json.dumps(payload)),
    )
    return int(run_id)
