-- Holds made by operators (pause(), resume(): db/sql/schema/05_pauses.sql).

-- name: pause :one
-- Hold a job, or one scope of it, until resumed or until a time; the hold as written.
SELECT p.job, p.scope, p.paused_at, p.paused_by, p.reason, p.until
FROM {s}.pause(%(job)s, %(scope)s, %(until)s, %(reason)s, %(by)s) AS p;

-- name: resume :one
-- Lift a job's or a scope's hold; whether one in force was lifted.
SELECT {s}.resume(%(job)s, %(scope)s, %(by)s) AS lifted;

-- name: next_release :one
-- When the soonest wait ends by itself, a hold's until or a delayed run's not_before: the scheduler wakes then, so the runs start.
-- runs_delayed makes the second a look at one index entry.
SELECT least(
    (SELECT min(until) FROM {s}.pauses WHERE until > now()),
    (SELECT min(not_before) FROM {s}.runs
     WHERE status = 'pending' AND not_before IS NOT NULL AND not_before > now())
) AS until;

-- name: key_held :one
-- Whether a hold in force covers a job's key now: a run about to retry waits as pending instead.
SELECT EXISTS (
    SELECT 1 FROM {s}.pauses h
    WHERE h.job = %(job)s AND (h.scope IS NULL OR h.scope = %(scope)s)
      AND (h.until IS NULL OR h.until > now())) AS held;
