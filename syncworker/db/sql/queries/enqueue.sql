-- Requests for runs: every one goes through trigger() (sql/009), which
-- validates, coalesces and reserves.

-- name: trigger :many
-- trigger() for the worker and the CLI: the ids of the runs created or joined, and whether created.
SELECT run_id, created
FROM {s}.trigger(%(job)s, %(scope)s, %(source)s, %(by)s, %(payload)s, %(scheduled_for)s,
                 %(run_after)s);

-- name: trigger_budgeted :many
-- trigger() within a lock budget, for the listening session (fragment lock_budget).
-- include: lock_budget
SELECT t.run_id, t.created FROM budget,
    LATERAL {s}.trigger(%(job)s || left(budget.v, 0), %(scope)s, %(source)s, %(by)s,
                        %(payload)s, %(scheduled_for)s, %(run_after)s) AS t;

-- name: trigger_and_claim :many
-- trigger() for a worker that heard the NOTIFY: the run inserted already claimed for it when it may (sql/006).
-- include: lock_budget
SELECT t.run_id, t.created, t.step_id, t.max_attempts FROM budget,
    LATERAL {s}.trigger_and_claim(%(me)s || left(budget.v, 0), %(first)s, %(events)s,
                                  %(job)s, %(scope)s, %(source)s, %(by)s, %(payload)s) AS t;

-- name: trigger_for_caller :many
-- trigger() for the Python API (trigger_sync): triggered_by defaults to the calling role.
SELECT run_id
FROM {s}.trigger(%(job)s, %(scope)s, %(source)s, coalesce(%(by)s, current_user), %(payload)s,
                 NULL, %(run_after)s);
