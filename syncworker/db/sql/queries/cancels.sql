-- Runs an operator cancelled (cancel(): db/sql/schema/17_cancel.sql).

-- name: cancel :one
-- Cancel a pending or running run; its status after the request.
SELECT {s}.cancel(%(id)s, %(reason)s, %(by)s, %(events)s) AS status;

-- name: cancel_request :one
-- The cancel asked for one of this worker's runs, if any: the wake that named it is only a hint.
SELECT 'cancelled by ' || requested_by || coalesce(': ' || reason, '') AS why
FROM {s}.cancels WHERE run_id = %(id)s;
