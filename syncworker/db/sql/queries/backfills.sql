-- Backfill: one run per past fire of a job's schedule (backfill(): db/sql/schema/18_backfill.sql).

-- name: backfill_job :one
-- What a backfill computes its fires from: the job's schedule as the workers registered it.
SELECT name, enabled, schedule, timezone, scopes, misfire_limit FROM {s}.jobs WHERE name = %(job)s;

-- name: backfill :many
-- Queue one run per fire (and scope) without a run yet; the runs queued, oldest fire first.
SELECT run_id, run_scope AS scope, fire AS scheduled_for
FROM {s}.backfill(%(job)s, %(scope)s, %(fires)s, %(by)s);
