-- What `status`, `/status` and `trigger --wait` read.

-- name: may_read_payload :one
-- Whether this role may select runs.payload (sql/007: the app role reads payloads from run_payloads).
SELECT has_column_privilege(c.oid, 'payload', 'SELECT') AS allowed
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = 'runs';

-- name: status_workers :many
-- The workers, live first, each with the runs it has running.
SELECT w.id, w.hostname, w.pid, w.version, w.state, w.started_at, w.heartbeat_at, w.stopped_at,
    (SELECT array_agg(r.id ORDER BY r.id) FROM {s}.runs r
     WHERE r.status = 'running' AND r.worker_id = w.id) AS current_runs
FROM {s}.workers w ORDER BY w.state = 'stopped', w.started_at DESC;

-- name: status_jobs :many
-- The jobs (all, or one), each with its next fire, its last run and its holds in force.
SELECT j.name, j.enabled, j.schedule, j.timezone, j.scopes, j.next_fire_at,
    j.last_fire_at, l.id AS last_run_id, l.status AS last_status,
    l.finished_at AS last_finished_at,
    h.job IS NOT NULL AS paused, h.paused_by, h.reason AS paused_reason,
    h.until AS paused_until,
    (SELECT coalesce(json_agg(json_build_object(
                'scope', s.scope, 'paused_by', s.paused_by, 'paused_reason', s.reason,
                'paused_until', s.until) ORDER BY s.scope), '[]'::json)
     FROM {s}.pauses s
     WHERE s.job = j.name AND s.scope IS NOT NULL
       AND (s.until IS NULL OR s.until > now())) AS paused_scopes
FROM {s}.jobs j LEFT JOIN LATERAL (
    SELECT id, status, finished_at FROM {s}.runs r WHERE r.job = j.name
    ORDER BY id DESC LIMIT 1) l ON true
LEFT JOIN {s}.pauses h
    ON h.job = j.name AND h.scope IS NULL AND (h.until IS NULL OR h.until > now())
WHERE %(job)s::text IS NULL OR j.name = %(job)s ORDER BY j.name;

-- name: status_summary :one
-- Counts of the runs (all, or one job's) by status, and the last success.
SELECT count(*) AS total,
    count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
    count(*) FILTER (WHERE status = 'failed') AS failed,
    count(*) FILTER (WHERE status = 'pending') AS pending,
    count(*) FILTER (WHERE status = 'running') AS running,
    max(finished_at) FILTER (WHERE status = 'succeeded') AS last_success_at
FROM {s}.runs WHERE %(job)s::text IS NULL OR job = %(job)s;

-- name: recent_runs :many
-- The newest runs (all, or one job's), payload included.
SELECT
-- include: run_columns_before_payload
payload,
-- include: run_columns_after_payload
FROM {s}.runs WHERE %(job)s::text IS NULL OR job = %(job)s ORDER BY id DESC LIMIT %(limit)s;

-- name: recent_runs_no_payload :many
-- The newest runs, for a role granted every column of runs but payload (sql/007).
SELECT
-- include: run_columns_before_payload
-- include: run_columns_after_payload
FROM {s}.runs WHERE %(job)s::text IS NULL OR job = %(job)s ORDER BY id DESC LIMIT %(limit)s;

-- name: read_run :one
-- One run's row, payload included.
SELECT
-- include: run_columns_before_payload
payload,
-- include: run_columns_after_payload
FROM {s}.runs WHERE id = %(id)s;

-- name: read_run_no_payload :one
-- One run's row, for a role granted every column of runs but payload (sql/007).
SELECT
-- include: run_columns_before_payload
-- include: run_columns_after_payload
FROM {s}.runs WHERE id = %(id)s;

-- name: may_read_actions :one
-- Whether this role may read the record of operators' actions (granted apart: README "Operating").
SELECT has_table_privilege(c.oid, 'SELECT') AS allowed
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = 'actions';

-- name: status_actions :many
-- The latest operators' actions (pause, resume, cancel), newest first.
SELECT id, at, actor, action, job, scope, run_id, detail
FROM {s}.actions ORDER BY id DESC LIMIT 20;

-- name: list_runs :many
-- A page of runs for the HTTP API, newest first: optional job, scope and
-- status filters, and a cursor (ids below %(before)s). runs_by_job serves a
-- job's page; the primary key the rest.
SELECT
-- include: run_columns_before_payload
payload,
-- include: run_columns_after_payload
-- include: list_runs_page
;

-- name: list_runs_no_payload :many
-- list_runs, for a role granted every column of runs but payload (sql/007).
SELECT
-- include: run_columns_before_payload
-- include: run_columns_after_payload
-- include: list_runs_page
;

-- name: run_steps :many
-- A run's steps, every attempt's, in the order they ran.
SELECT id, attempt, position, name, status, started_at, finished_at, duration_ms,
    records_total, records_processed, records_inserted, records_updated, records_deleted,
    records_errored, error
FROM {s}.run_steps WHERE run_id = %(id)s ORDER BY attempt, position;
