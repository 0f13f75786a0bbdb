-- Cron fires: each claimed once, by one worker, in jobs.last_fire_at.

-- fragment: fire_claim
-- Claim one fire of a job: move last_fire_at to it unless it is there or past already.
-- A fire is claimed only once due by the database's clock (with a second for
-- the worker's reading of it, dbclock.py): a worker whose clock runs ahead can
-- neither take fires early nor move last_fire_at past now, which would hold
-- every fire back.
UPDATE {s}.jobs SET last_fire_at = %(fire)s
WHERE name = %(job)s AND (last_fire_at IS NULL OR last_fire_at < %(fire)s)
  AND %(fire)s <= now() + interval '1 second'
RETURNING name

-- name: claim_fire :one
-- Claim a fire without running it (misfire = skip, or a fire passed over).
-- include: fire_claim

-- name: enqueue_fire :many
-- Claim a fire and enqueue its runs: a row per run, one with no run, or none when claimed already.
-- The claim and its runs in one statement, so one round trip where BEGIN, the
-- claim, trigger() and COMMIT took four.
WITH fire AS (
-- include: fire_claim
)
SELECT t.run_id, t.created FROM fire LEFT JOIN LATERAL
    {s}.trigger(fire.name, NULL, 'cron', 'cron', %(payload)s, %(fire)s) AS t ON true;

-- name: fire_state :many
-- Every job's latest claimed fire, for misfire decisions at start and reload.
SELECT name, last_fire_at FROM {s}.jobs;

-- name: set_next_fire :none
-- Record each job's next fire (shown by status), writing only those that changed.
UPDATE {s}.jobs AS j SET next_fire_at = f.next
FROM unnest(%(names)s::text[], %(nexts)s::timestamptz[]) AS f(name, next)
WHERE j.name = f.name AND j.next_fire_at IS DISTINCT FROM f.next;

-- name: enqueue_missed_fires :many
-- Claim the latest missed fire and queue a backfill run per missed fire (misfire = "all"): a row per run, one with no run, or none when claimed already.
-- Only the instance whose claim moves last_fire_at queues them, and the
-- claim and the runs commit together; fires inside a hold make no run.
WITH fire AS (
-- include: fire_claim
)
SELECT b.run_id, true AS created FROM fire LEFT JOIN LATERAL
    {s}.backfill(fire.name, NULL, %(fires)s, 'misfire', true) AS b ON true;
