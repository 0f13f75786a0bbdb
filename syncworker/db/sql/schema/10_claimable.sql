-- claimable(jobs): the run a claim takes, picked and locked (004, 005, 010,
-- 012, 013).
--
-- The oldest pending run of one of `jobs` whose key is not running and that
-- is reserved for no worker nor held by a pause in force (05_pauses.sql)
-- nor delayed past now (not_before, a delayed trigger), and, for a backfill
-- run, whose key has no backfill run of an earlier fire pending, FOR UPDATE
-- SKIP LOCKED; the claim statement
-- (claim_next in db/sql/queries/runs.sql) updates it in the same
-- transaction. With sorting switched off for this one query the plan left is
-- the walk up runs_active in id order that stops at the first run that fits:
-- with the statistics sampled while almost nothing is pending, the planner
-- preferred to read every pending run and sort, and a claim cost in
-- proportion to the backlog. runs_one_running_per_key still guards the
-- one-running-per-key rule. The earlier-fire test keeps backfill runs in
-- fire order across instances: SKIP LOCKED alone would let a second claim
-- pass over the fire a first claim has locked and take the next one. It
-- sees that run pending until the first claim commits, and the key running
-- after. Only the worker calls it.

CREATE FUNCTION __SCHEMA__.claimable(jobs text[]) RETURNS SETOF bigint
LANGUAGE sql
ROWS 1
SET enable_sort = off
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT p.id FROM __SCHEMA__.runs p
    WHERE p.status = 'pending' AND p.job = ANY(jobs) AND p.reserved_for IS NULL
      AND (p.not_before IS NULL OR p.not_before <= now())
      -- In this order (a CASE): the earlier-fire test is made only for a
      -- key that is not running, or a backlog of one key's fires would
      -- each run it while that key runs.
      AND CASE WHEN EXISTS (
                   SELECT 1 FROM __SCHEMA__.runs x
                   WHERE x.status = 'running' AND x.job = p.job
                     AND coalesce(x.scope, '') = coalesce(p.scope, ''))
               THEN false
               WHEN p.source = 'backfill' THEN NOT EXISTS (
                   SELECT 1 FROM __SCHEMA__.runs o
                   WHERE o.status = 'pending' AND o.source = 'backfill' AND o.job = p.job
                     AND coalesce(o.scope, '') = coalesce(p.scope, '')
                     AND o.scheduled_for < p.scheduled_for)
               ELSE true END
      AND NOT EXISTS (
          SELECT 1 FROM __SCHEMA__.pauses h
          WHERE h.job = p.job AND (h.scope IS NULL OR h.scope = p.scope)
            AND (h.until IS NULL OR h.until > now()))
    ORDER BY p.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
$fn$;

REVOKE EXECUTE ON FUNCTION __SCHEMA__.claimable(text[]) FROM PUBLIC;
