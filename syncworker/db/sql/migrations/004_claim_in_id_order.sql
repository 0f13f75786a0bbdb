-- syncworker schema, version 4: a claim finds its run by walking pending runs
-- in id order, whatever the statistics say.
--
-- A claim takes the oldest pending run whose key is not running: a walk up an
-- index in id order (runs_active) that stops at the first run that fits. But
-- the planner's statistics are sampled while almost nothing is pending, and
-- with them it preferred to read every pending run of the jobs through
-- runs_one_pending_per_key, check each against the running ones, and sort.
-- Each claim then cost in proportion to the backlog (2.3 ms with 2,000
-- pending runs), and a burst of triggers over many scopes took quadratic time
-- to drain: three to four times longer for 1,000 runs. With sorting switched
-- off for this one query, the ordered walk is the plan left.
--
-- The function only picks and locks (FOR UPDATE SKIP LOCKED, as before); the
-- claim statement updates the row in the same transaction. The unique index
-- runs_one_running_per_key still guards the one-running-per-key rule.

CREATE FUNCTION __SCHEMA__.claimable(jobs text[]) RETURNS SETOF bigint
LANGUAGE sql
ROWS 1
SET enable_sort = off
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT p.id FROM __SCHEMA__.runs p
    WHERE p.status = 'pending' AND p.job = ANY(jobs)
      AND NOT EXISTS (
          SELECT 1 FROM __SCHEMA__.runs x
          WHERE x.status = 'running' AND x.job = p.job
            AND coalesce(x.scope, '') = coalesce(p.scope, ''))
    ORDER BY p.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
$fn$;

-- A new function is executable by PUBLIC (see 002); only the worker calls it.
REVOKE EXECUTE ON FUNCTION __SCHEMA__.claimable(text[]) FROM PUBLIC;
