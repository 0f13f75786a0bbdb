-- Runs trigger() reserved for one worker (sql/005, sql/007): the reservation
-- is the fence, and a wake notification only a hint of which run to try.

-- name: claim_reserved :one
-- Claim a run reserved for this worker from its row, or give back one of a job it no longer runs.
-- The notification that named the run is a hint and nothing more: this
-- statement alone decides, from the row, whether the run is ours (reserved for
-- us, still pending, a job we run), and returns the row the step starts from,
-- with the same writes as claim_next. A reservation of a job we no longer run
-- (a reload since it was made), of a key paused since (05_pauses.sql), or
-- delayed since by a trigger that joined it (not_before), is given back in
-- the same statement.
-- include: lock_budget
, target AS MATERIALIZED (
    -- Joined with budget: its lock_timeout is set before the row is locked.
    SELECT r.id, r.job = ANY(%(jobs)s) AND NOT EXISTS (
               SELECT 1 FROM {s}.pauses h
               WHERE h.job = r.job AND (h.scope IS NULL OR h.scope = r.scope)
                 AND (h.until IS NULL OR h.until > now()))
           AND (r.not_before IS NULL OR r.not_before <= now()) AS ours
    FROM {s}.runs r, budget
    WHERE r.id = %(id)s AND r.status = 'pending' AND r.reserved_for = %(worker)s
    FOR UPDATE OF r
), released AS (
    UPDATE {s}.runs AS r SET reserved_for = NULL
    FROM target t WHERE r.id = t.id AND NOT t.ours
    RETURNING pg_notify(%(wake)s, r.job)
), claimed AS (
    UPDATE {s}.runs AS r
    SET reserved_for = NULL,
-- include: run_start
    FROM target t
    WHERE r.id = t.id AND t.ours
-- include: claimed_row
       , (SELECT count(*) FROM released) AS released
FROM claimed c;

-- name: release_reserved :one
-- Give back the runs reserved for this worker (all, or one), but those kept, and wake the others.
WITH freed AS (
    UPDATE {s}.runs AS r SET reserved_for = NULL
    WHERE r.reserved_for = %(worker)s AND r.status = 'pending'
      AND (%(only)s::bigint IS NULL OR r.id = %(only)s::bigint)
      AND NOT (r.id = ANY(%(keep)s::bigint[]))
    RETURNING r.job
)
SELECT count(pg_notify(%(wake)s, job)) AS released FROM freed;

-- name: reserved_runs :many
-- The runs reserved for this worker and not claimed yet, for wakes it may not have heard.
SELECT id FROM {s}.runs WHERE reserved_for = %(worker)s AND status = 'pending' ORDER BY id;

-- name: offer :none
-- Tell trigger() what this worker takes reservations for: its slots and each job's first step.
UPDATE {s}.workers SET concurrency = %(concurrency)s, first_steps = %(first)s,
    reserve_by_id = %(by_id)s
WHERE id = %(id)s;
