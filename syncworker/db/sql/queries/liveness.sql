-- Who is alive: the session advisory lock each worker holds, and what
-- happens to the runs and reservations of a worker that is gone.

-- name: try_liveness_lock :one
-- Try to take the session lock that tells other workers this one is alive.
SELECT pg_try_advisory_lock(%(ns)s, %(key)s) AS taken;

-- name: end_liveness_lock_holder :none
-- End the other session of ours that still holds our liveness lock (a partition's leftover).
SELECT pg_terminate_backend(l.pid) FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid = %(ns)s::bigint::oid AND l.objid = %(key)s::bigint::oid
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.pid <> pg_backend_pid();

-- fragment: worker_gone
-- Whether worker `w` (LEFT JOINed) is gone: no row, stopped, or, when peers may be judged, its lock free or its beat stale.
-- Either way its heartbeat must be `takeover` old, by this database's clock
-- as it was written: until then the worker's lease may hold and its steps run
-- (lease.py; README "Self-fencing"). `takeover` and `stale` are the judged
-- worker's own, from its row (sql/009): its lease is as long as its interval
-- says, whatever the judge's; a row without them (an earlier version) is
-- judged by the judge's.
(w.id IS NULL
           OR w.state = 'stopped'
           OR %(judge)s
              AND pg_postmaster_start_time() < now() - make_interval(secs => %(grace)s)
              AND w.heartbeat_at < now() - make_interval(
                  secs => coalesce(w.takeover_after, %(takeover)s))
              AND (w.heartbeat_at < now() - make_interval(
                       secs => coalesce(w.stale_after, %(stale)s))
                   OR NOT EXISTS (
                       SELECT 1 FROM pg_locks l
                       WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                         -- pg_locks spans the cluster; lock keys are per database
                         AND l.database = (SELECT oid FROM pg_database
                                           WHERE datname = current_database())
                         AND l.classid = %(ns)s::bigint::oid
                         AND l.objid = w.lock_key::bigint::oid)))

-- name: recover_orphans :many
-- Take back the runs of workers that are gone: pending again while attempts are left, else failed (cancelled when asked).
-- A run is orphaned when its worker no longer holds its liveness lock (the
-- session died: kill -9, host loss, lost connection), has stopped, has no
-- row, or stopped heartbeating (fragment worker_gone). It goes back to pending
-- while it has attempts left and no follow-up is already pending (a backfill
-- run has none: it waits beside the others, one per fire), else it fails. Runs recorded under this worker but not in flight here are orphans
-- too: their final write was lost in a database outage. A run an operator
-- cancelled (cancels) is never retried: it ends cancelled, as its owner would
-- have ended it.
WITH lost AS (
    SELECT r.id,
           c.run_id IS NULL AND r.attempt < r.max_attempts AND (
               r.source = 'backfill' OR NOT EXISTS (
                   SELECT 1 FROM {s}.runs p
                   WHERE p.status = 'pending' AND p.source <> 'backfill' AND p.job = r.job
                     AND coalesce(p.scope, '') = coalesce(r.scope, ''))) AS retry,
           CASE WHEN c.run_id IS NOT NULL
                THEN 'cancelled by ' || c.requested_by || coalesce(': ' || c.reason, '')
           END AS cancelled
    FROM {s}.runs r
    LEFT JOIN {s}.workers w ON w.id = r.worker_id
    LEFT JOIN {s}.cancels c ON c.run_id = r.id
    WHERE r.status = 'running'
      AND (r.worker_id = %(me)s AND NOT (r.id = ANY(%(mine)s::bigint[]))
           -- not one claimed after the in-flight list was taken
           AND r.started_at < now() - make_interval(secs => %(stale)s)
           OR r.worker_id IS DISTINCT FROM %(me)s AND
-- include: worker_gone
           )
    FOR UPDATE OF r SKIP LOCKED
), steps AS (
    UPDATE {s}.run_steps st
    SET status = 'failed', finished_at = now(), error = coalesce(lost.cancelled, 'worker lost'),
        duration_ms = (extract(epoch FROM now() - st.started_at) * 1000)::bigint
    FROM lost WHERE st.run_id = lost.id AND st.status = 'running'
)
UPDATE {s}.runs AS r
SET status = CASE WHEN lost.cancelled IS NOT NULL THEN 'cancelled'
                  WHEN lost.retry THEN 'pending' ELSE 'failed' END,
    started_at = CASE WHEN lost.retry THEN NULL ELSE r.started_at END,
    finished_at = CASE WHEN lost.retry THEN NULL ELSE now() END,
    duration_ms = CASE WHEN lost.retry THEN NULL
                       ELSE (extract(epoch FROM now() - r.started_at) * 1000)::bigint END,
    worker_id = CASE WHEN lost.retry THEN NULL ELSE r.worker_id END,
    current_step = NULL, error = coalesce(lost.cancelled, 'worker lost')
FROM lost WHERE r.id = lost.id
RETURNING r.id, r.job, r.scope, r.status, pg_notify(%(events)s, json_build_object(
    'event', CASE WHEN r.status = 'failed' THEN 'run_failed' ELSE 'run_cancelled' END,
    'run_id', r.id, 'job', r.job, 'scope', r.scope, 'status', r.status)::text) AS event;

-- name: unreserve_gone :one
-- Clear the reservations of workers gone by recover_orphans' rules, so any worker may claim those runs.
WITH gone AS (
    SELECT r.id FROM {s}.runs r
    LEFT JOIN {s}.workers w ON w.id = r.reserved_for
    WHERE r.reserved_for IS NOT NULL AND r.reserved_for <> %(me)s AND r.status = 'pending'
      AND
-- include: worker_gone
    FOR UPDATE OF r SKIP LOCKED
), freed AS (
    UPDATE {s}.runs AS r SET reserved_for = NULL FROM gone WHERE r.id = gone.id RETURNING r.id
)
SELECT count(*) AS freed FROM freed;
