-- A run's life once claimed: its claim, steps, progress and outcome. Every
-- write after the claim is fenced (fragment run_fence). pg_notify() in
-- RETURNING publishes the run event in the same statement, and so in the same
-- transaction, as the status change it reports.

-- name: claim_next :one
-- Take the oldest pending run whose key is not running anywhere, and start its first step.
-- The pick, claimable() (sql/004: the oldest pending run whose key is not
-- running, FOR UPDATE SKIP LOCKED, found in id order whatever the statistics),
-- is a MATERIALIZED CTE, evaluated exactly once: as a FROM subquery the
-- planner may rescan it once per outer row, and every rescan of LIMIT 1 ...
-- SKIP LOCKED picks (and this UPDATE claims) another run. The first step's
-- start is written by the same statement: an idle worker's trigger-to-step
-- time is counted in round trips, and this saves one.
WITH picked AS MATERIALIZED (
    SELECT id FROM {s}.claimable(%(jobs)s) AS id
), claimed AS (
    UPDATE {s}.runs AS r
    SET
-- include: run_start
    FROM picked
    WHERE r.id = picked.id
-- include: claimed_row
FROM claimed c;

-- name: finish_run :one
-- Write a run's outcome and counters if this worker still owns it; publish run_<status>.
UPDATE {s}.runs AS r
SET status = %(status)s, finished_at = now(), current_step = NULL,
    duration_ms = (extract(epoch FROM now() - r.started_at) * 1000)::bigint,
    error = %(error)s,
-- include: run_counters
WHERE
-- include: run_fence
RETURNING r.id, pg_notify(%(events)s, json_build_object('event', %(event)s::text, 'run_id', r.id,
    'job', r.job, 'scope', r.scope, 'status', r.status)::text) AS event;

-- name: write_progress :one
-- Write a run's counters and current step if this worker still owns it; maybe publish run_progress.
-- Only the orchestrator's periodic flush publishes: the write at each step
-- start stays silent, so runs made of quick steps add no events to the
-- channel, and followers see only status changes for them.
UPDATE {s}.runs AS r SET current_step = %(step)s,
-- include: run_counters
WHERE
-- include: run_fence
RETURNING r.id, CASE WHEN %(publish)s THEN pg_notify(%(events)s, json_build_object(
    'event', 'run_progress', 'run_id', r.id, 'job', r.job, 'scope', r.scope,
    'status', r.status, 'step', r.current_step, 'records_processed', r.records_processed,
    'records_total', r.records_total)::text) END AS event;

-- name: start_step :one
-- Record a step's start and make it the run's current step, fenced; returns the step's row id.
-- One statement, so one round trip between a claim and the step's first line.
WITH progress AS (
    UPDATE {s}.runs AS r SET current_step = %(step)s,
-- include: run_counters
    WHERE
-- include: run_fence
)
INSERT INTO {s}.run_steps (run_id, attempt, position, name, status)
VALUES (%(id)s, %(attempt)s, %(position)s, %(step)s, 'running')
RETURNING id;

-- name: finish_step :none
-- Write a step's outcome, duration and counters.
UPDATE {s}.run_steps
SET status = %(status)s, finished_at = now(), error = %(error)s,
    duration_ms = (extract(epoch FROM now() - started_at) * 1000)::bigint,
-- include: run_counters
WHERE id = %(id)s;

-- name: next_attempt :one
-- Count a retry of a run this worker still owns.
UPDATE {s}.runs AS r SET attempt = r.attempt + 1
WHERE
-- include: run_fence
RETURNING r.id;

-- name: requeue_run :one
-- Give an interrupted run back: pending, or cancelled when a follow-up of its key is pending.
-- The attempt number stays: it keys the attempt's run_steps rows, and the
-- next claim starts a new attempt (always at least one more try). A
-- backfill run waits beside its key's other pending runs, one per fire
-- (runs_one_pending_per_key leaves them out), so it always goes back; only
-- a pending run of the index's kind stands in for any other.
UPDATE {s}.runs AS r
SET status = CASE WHEN f.has_pending THEN 'cancelled' ELSE 'pending' END,
    finished_at = CASE WHEN f.has_pending THEN now() END,
    duration_ms = CASE WHEN f.has_pending
                       THEN (extract(epoch FROM now() - r.started_at) * 1000)::bigint END,
    started_at = CASE WHEN f.has_pending THEN r.started_at END,
    worker_id = CASE WHEN f.has_pending THEN r.worker_id END,
    current_step = NULL, error = %(error)s
FROM (SELECT EXISTS (
        SELECT 1 FROM {s}.runs p, {s}.runs me
        WHERE me.id = %(id)s AND me.source <> 'backfill'
          AND p.status = 'pending' AND p.source <> 'backfill' AND p.job = me.job
          AND coalesce(p.scope, '') = coalesce(me.scope, ''))
      AS has_pending) AS f
WHERE
-- include: run_fence
RETURNING r.status, pg_notify(%(events)s, json_build_object('event', 'run_cancelled',
    'run_id', r.id, 'job', r.job, 'scope', r.scope, 'status', r.status)::text) AS event;
