-- Holds made by operators (pause(), resume(): db/sql/schema/05_pauses.sql).

-- name: pause :one
-- Hold a job, or one scope of it, until resumed or until a time; the hold as written.
SELECT p.job, p.scope, p.paused_at, p.paused_by, p.reason, p.until
FROM {s}.pause(%(job)s, %(scope)s, %(until)s, %(reason)s, %(by)s) AS p;

-- name: resume :one
-- Lift a job's or a scope's hold; whether one in force was lifted.
SELECT {s}.resume(%(job)s, %(scope)s, %(by)s) AS lifted;

-- name: next_hold_end :one
-- When the soonest hold in force ends by itself: the scheduler wakes then, so its runs start.
SELECT min(until) AS until FROM {s}.pauses WHERE until > now();

-- name: key_held :one
-- Whether a hold in force covers a job's key now: a run about to retry waits as pending instead.
SELECT EXISTS (
    SELECT 1 FROM {s}.pauses h
    WHERE h.job = %(job)s AND (h.scope IS NULL OR h.scope = %(scope)s)
      AND (h.until IS NULL OR h.until > now())) AS held;
