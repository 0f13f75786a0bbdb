-- Text several statements share, included with `-- include: NAME` on a line
-- of its own and resolved once when the files are loaded (db/sqlfile.py).

-- fragment: lock_budget
-- A CTE `budget` that gives its statement its own lock_timeout.
-- For the listener's enqueues: an app transaction holding a key (its
-- trigger() left uncommitted) must not stall the session every notification
-- comes through. set_config(..., true) lasts for the current transaction: in
-- autocommit, this statement alone. The MATERIALIZED CTE is evaluated once,
-- and the call takes an argument from it (an empty string), so the setting is
-- in place before the call runs. A NULL %(lock_timeout)s keeps the session's
-- own setting.
WITH budget AS MATERIALIZED (SELECT set_config('lock_timeout', coalesce(%(lock_timeout)s::text, current_setting('lock_timeout')), true) AS v)

-- fragment: run_fence
-- The fence of every write that concludes or advances a run: it applies only
-- while the run is still `running` under this worker and attempt, so a worker
-- that lost its run to orphan recovery cannot overwrite the outcome.
r.id = %(id)s AND r.status = 'running' AND r.worker_id = %(worker)s AND r.attempt = %(attempt)s

-- fragment: run_counters
-- The counters a run and a step carry, set from Counters.as_params().
    records_total = %(total)s, records_processed = %(processed)s,
    records_inserted = %(inserted)s, records_updated = %(updated)s,
    records_deleted = %(deleted)s, records_errored = %(errored)s

-- fragment: run_start
-- What a claim writes to the run it starts (claim_next, claim_reserved): the
-- assignments of its SET. started_at is clock_timestamp(), read while the row
-- is written: now() is the transaction's start, taken before the snapshot, so
-- on a busy server it can predate the finish of the run this claim saw end,
-- and the run log would show two runs of one key overlapping when they did not.
        status = 'running', started_at = clock_timestamp(), finished_at = NULL,
        duration_ms = NULL, worker_id = %(worker)s, attempt = r.attempt + 1, error = NULL,
        current_step = %(first)s::jsonb ->> r.job,
        records_total = NULL, records_processed = 0, records_inserted = 0, records_updated = 0,
        records_deleted = 0, records_errored = 0

-- fragment: claimed_row
-- The claimed run's columns, its run_started event and its first step's row:
-- the tail of claim_next and claim_reserved after their `claimed` CTE.
    RETURNING r.id, r.job, r.scope, r.source, r.triggered_by, r.payload, r.scheduled_for,
              r.attempt, r.max_attempts, pg_notify(%(events)s, json_build_object(
                  'event', 'run_started', 'run_id', r.id, 'job', r.job,
                  'scope', r.scope, 'status', r.status)::text) AS event
), step AS (
    INSERT INTO {s}.run_steps (run_id, attempt, position, name, status)
    SELECT c.id, c.attempt, 0, %(first)s::jsonb ->> c.job, 'running'
    FROM claimed c WHERE %(first)s::jsonb ->> c.job IS NOT NULL
    RETURNING id
)
SELECT c.id, c.job, c.scope, c.source, c.triggered_by, c.payload, c.scheduled_for,
       c.attempt, c.max_attempts, c.event, (SELECT id FROM step) AS first_step_id

-- fragment: run_columns_before_payload
-- The columns of runs up to payload, for reads with and without it.
id, job, scope, status, source, triggered_by,

-- fragment: run_columns_after_payload
-- The columns of runs after payload.
scheduled_for, requested_at, started_at, finished_at, duration_ms, attempt, max_attempts,
triggers, worker_id, current_step, records_total, records_processed, records_inserted,
records_updated, records_deleted, records_errored, error, not_before

-- fragment: list_runs_page
-- The filters, cursor and order of list_runs (with and without payload).
FROM {s}.runs
WHERE (%(job)s::text IS NULL OR job = %(job)s)
  AND (%(scope)s::text IS NULL OR scope = %(scope)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(before)s::bigint IS NULL OR id < %(before)s)
ORDER BY id DESC LIMIT %(limit)s
