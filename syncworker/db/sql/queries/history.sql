-- Keeping runs from growing without bound (pruning.py).

-- name: prune_history :rowcount
-- Delete the finished runs older than %(days)s in one window of ids, but the newest of each key.
-- One window of ids (pruning.py), under SKIP LOCKED, so pruning never holds
-- many locks or waits on another instance doing the same. The newest run of
-- each key is kept however old, so `status` and the metrics still show every
-- key's last result. The test for a newer run is split on scope being NULL:
-- `IS NOT DISTINCT FROM` cannot use runs_by_job (job, scope, id DESC), and
-- without the index each test read every run of the job.
WITH old AS (
    SELECT r.id FROM {s}.runs r
    WHERE r.id > %(after)s AND r.id <= %(until)s
      AND r.status IN ('succeeded', 'failed', 'cancelled', 'skipped')
      AND r.finished_at < now() - make_interval(secs => %(days)s * 86400)
      AND (r.scope IS NULL AND EXISTS (
               SELECT 1 FROM {s}.runs n
               WHERE n.job = r.job AND n.scope IS NULL AND n.id > r.id)
           OR r.scope IS NOT NULL AND EXISTS (
               SELECT 1 FROM {s}.runs n
               WHERE n.job = r.job AND n.scope = r.scope AND n.id > r.id))
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {s}.runs AS r USING old WHERE r.id = old.id;

-- name: max_run_id :one
-- The newest run's id, where pruning's windows end.
SELECT coalesce(max(id), 0) AS max_id FROM {s}.runs;
