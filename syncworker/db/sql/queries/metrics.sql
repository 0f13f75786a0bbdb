-- The database-backed gauges, read at scrape time (metrics.py).

-- name: metrics_jobs :many
-- Every job, so each shows a pending gauge (at 0 when nothing waits: absent is not zero to an alert).
SELECT name FROM {s}.jobs;

-- name: metrics_pending :many
-- Pending runs per job.
SELECT job, count(*) AS pending FROM {s}.runs WHERE status = 'pending' GROUP BY job;

-- name: metrics_last_success :many
-- Each key's last success, as epoch seconds.
-- Runs grow without bound, so no max() over all of them on every scrape: the
-- runs of a key never overlap, so its newest succeeded run finished last, and
-- runs_by_job finds it reading only the runs since. The ORDER BY names the
-- index's columns so the planner keeps to it (`scope IS NULL` is no equality).
SELECT j.name AS job, k.scope, extract(epoch FROM l.finished_at)::float8 AS finished_at
FROM {s}.jobs j
CROSS JOIN LATERAL unnest(coalesce(j.scopes, ARRAY[NULL::text])) AS k(scope)
CROSS JOIN LATERAL (
    (SELECT r.finished_at FROM {s}.runs r
     WHERE k.scope IS NOT NULL AND r.job = j.name AND r.scope = k.scope
       AND r.status = 'succeeded'
     ORDER BY r.job, r.scope, r.id DESC LIMIT 1)
    UNION ALL
    (SELECT r.finished_at FROM {s}.runs r
     WHERE k.scope IS NULL AND r.job = j.name AND r.scope IS NULL
       AND r.status = 'succeeded'
     ORDER BY r.job, r.scope, r.id DESC LIMIT 1)
) l
WHERE l.finished_at IS NOT NULL;
