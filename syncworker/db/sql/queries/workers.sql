-- The workers' own rows: one per live or recently stopped worker.

-- name: register_worker :one
-- Insert this worker's row with the silences after which peers may take its runs (sql/009).
INSERT INTO {s}.workers (id, hostname, pid, version, state, takeover_after, stale_after)
VALUES (%(id)s, %(hostname)s, %(pid)s, %(version)s, 'starting', %(takeover)s, %(stale)s)
RETURNING lock_key;

-- name: forget_old_workers :none
-- Forget the workers that stopped or vanished more than a day ago.
DELETE FROM {s}.workers WHERE heartbeat_at < now() - interval '1 day';

-- name: heartbeat :one
-- Record this worker's beat and state; returns the runs still running under it (its fence check).
UPDATE {s}.workers SET heartbeat_at = now(), state = %(state)s,
    stopped_at = CASE WHEN %(state)s = 'stopped' THEN now() END
WHERE id = %(id)s
RETURNING (SELECT coalesce(array_agg(r.id), '{{}}') FROM {s}.runs r
           WHERE r.worker_id = %(id)s AND r.status = 'running') AS running;
