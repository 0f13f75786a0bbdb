-- backfill(job, scope, fires, by, skip_held): queue one run per fire that
-- has no run yet (013); returns the runs queued.
--
-- `fires` are cron fire times, computed from the job's schedule by the
-- caller (the CLI and control.backfill from jobs.schedule; the worker for
-- misfire = "all"): SQL cannot read cron, so the function checks only what
-- it can, an enabled job, its scopes as trigger() does, at most 10000 fires,
-- none NULL, infinite, before 1900 (a time every worker can read back) or in
-- the future (a future fire's run would take the fire's one slot,
-- runs_one_per_cron_fire). A scope NULL of a job with
-- scopes is every scope. Each run is `pending` with source 'backfill' and
-- scheduled_for its fire, inserted oldest fire first so that the claim's
-- walk in id order runs them oldest first, one at a time per key
-- (runs_one_running_per_key). Backfill runs are the one kind of run
-- runs_one_pending_per_key leaves out, so several wait per key, one per
-- fire; trigger() refuses the source 'backfill' so that no caller can use
-- it to queue more. With skip_held (the worker's misfire catch-up), a fire
-- whose time fell inside a hold makes no run, as trigger() does for cron
-- fires. Recorded in actions; workers are woken at commit. SECURITY
-- DEFINER, EXECUTE revoked from PUBLIC: granted per role (README
-- "Operating").

CREATE FUNCTION __SCHEMA__.backfill(
    job       text,
    scope     text DEFAULT NULL,
    fires     timestamptz[] DEFAULT NULL,
    by        text DEFAULT NULL,
    skip_held boolean DEFAULT false
) RETURNS TABLE (run_id bigint, run_scope text, fire timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    j          __SCHEMA__.jobs%ROWTYPE;
    scope_list text[];
    actor      text := session_user::text;  -- the record names the role, whatever `by` says
    asker      text := coalesce(backfill.by, session_user::text);
    bad        timestamptz;
    queued     integer;
BEGIN
    SELECT * INTO j FROM __SCHEMA__.jobs WHERE name = backfill.job;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'syncworker: unknown job %', quote_literal(coalesce(backfill.job, 'NULL'))
            USING ERRCODE = '22023',
                  HINT = 'known jobs: ' || coalesce(
                      (SELECT string_agg(name, ', ' ORDER BY name) FROM __SCHEMA__.jobs), 'none');
    END IF;
    IF NOT j.enabled THEN
        RAISE EXCEPTION 'syncworker: job % is disabled', quote_literal(j.name) USING ERRCODE = '22023';
    END IF;
    IF j.scopes IS NULL THEN
        IF backfill.scope IS NOT NULL THEN
            RAISE EXCEPTION 'syncworker: job % has no scopes, but scope % was given',
                quote_literal(j.name), quote_literal(backfill.scope) USING ERRCODE = '22023';
        END IF;
        scope_list := ARRAY[NULL::text];
    ELSIF backfill.scope IS NULL THEN
        scope_list := j.scopes;
    ELSIF backfill.scope = ANY (j.scopes) THEN
        scope_list := ARRAY[backfill.scope];
    ELSE
        RAISE EXCEPTION 'syncworker: unknown scope % for job %',
            quote_literal(backfill.scope), quote_literal(j.name)
            USING ERRCODE = '22023', HINT = 'scopes: ' || array_to_string(j.scopes, ', ');
    END IF;
    IF coalesce(cardinality(backfill.fires), 0) = 0 THEN
        RAISE EXCEPTION 'syncworker: no fires given' USING ERRCODE = '22023';
    END IF;
    IF cardinality(backfill.fires) > 10000 THEN
        RAISE EXCEPTION 'syncworker: % fires given, at most 10000 at once',
            cardinality(backfill.fires) USING ERRCODE = '22023';
    END IF;
    SELECT f INTO bad FROM unnest(backfill.fires) f
    WHERE f IS NULL OR NOT isfinite(f) OR f > now() + interval '1 second'
       -- A time every worker can read back (Python's datetime ends at year 1).
       OR f < '1900-01-01 00:00+00'
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'syncworker: fire % is not a past time since 1900: backfill queues fires that are due',
            coalesce(bad::text, 'NULL') USING ERRCODE = '22023';
    END IF;

    RETURN QUERY
    WITH queued_runs AS (
        INSERT INTO __SCHEMA__.runs AS r
            (job, scope, status, source, triggered_by, scheduled_for, max_attempts, not_before)
        -- A fire up to a second ahead (the clocks' slack) starts no sooner.
        SELECT j.name, s.one, 'pending', 'backfill', asker, f.at, j.retries + 1,
               CASE WHEN f.at > now() THEN f.at END
        FROM (SELECT DISTINCT at FROM unnest(backfill.fires) AS at) f,
             unnest(scope_list) AS s(one)
        WHERE NOT (backfill.skip_held AND EXISTS (
            SELECT 1 FROM __SCHEMA__.pauses h
            WHERE h.job = j.name AND (h.scope IS NULL OR h.scope = s.one)
              AND h.paused_at <= f.at AND (h.until IS NULL OR h.until > f.at)))
        ORDER BY f.at, s.one
        ON CONFLICT DO NOTHING  -- runs_one_per_cron_fire: the fire has a run
        RETURNING r.id, r.scope, r.scheduled_for
    )
    SELECT q.id, q.scope, q.scheduled_for FROM queued_runs q ORDER BY q.id;
    GET DIAGNOSTICS queued = ROW_COUNT;

    INSERT INTO __SCHEMA__.actions (actor, action, job, scope, detail)
    VALUES (actor, 'backfill', j.name, backfill.scope,
            json_build_object('fires', cardinality(backfill.fires), 'queued', queued,
                              'from', (SELECT min(f) FROM unnest(backfill.fires) f),
                              'to', (SELECT max(f) FROM unnest(backfill.fires) f),
                              'by', backfill.by)::jsonb);
    IF queued > 0 THEN
        PERFORM pg_notify(__WAKE__, j.name);  -- delivered at commit
    END IF;
END
$fn$;

REVOKE EXECUTE ON FUNCTION __SCHEMA__.backfill(text, text, timestamptz[], text, boolean)
    FROM PUBLIC;
