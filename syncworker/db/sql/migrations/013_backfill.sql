-- syncworker schema, version 13: backfill, and misfire = "all".
--
-- backfill(job, scope, fires, by, skip_held) queues one `pending` run per
-- past fire (and scope) that has no run yet, source 'backfill' and
-- scheduled_for its fire; `syncworker backfill` computes the fires of a
-- window from jobs.schedule, and a worker with misfire = "all" those it
-- missed (the latest misfire_limit, a new column of jobs). Several such runs
-- wait per key, one per fire, so runs_one_pending_per_key now leaves
-- backfill runs out; trigger() refuses the source 'backfill' (and
-- trigger_and_claim() leaves it to trigger()), so every other run still
-- coalesces into one pending run per key. They run one at a time per key
-- (runs_one_running_per_key), oldest fire first: claimable() passes over a
-- backfill run while its key has one of an earlier fire pending, so that
-- SKIP LOCKED cannot let a second instance take the next fire while a
-- first has the earlier one locked. refuse_forged_cron_fire() lets a role that may execute backfill()
-- write the fires it backfills; backfill() is executable by no role until
-- granted (README "Operating"), and records itself in actions.
--
-- An existing install sees a rebuilt partial index (a pending run a caller
-- gave the source 'backfill' before, when trigger() still took it, is left
-- out of it too, and runs as one), misfire 'all' and misfire_limit in jobs,
-- and a new action. Workers of version 12 still running in a rolling upgrade
-- never queue backfill runs and claim them like any other run.

ALTER TABLE __SCHEMA__.jobs DROP CONSTRAINT jobs_misfire_check;
ALTER TABLE __SCHEMA__.jobs ADD CONSTRAINT jobs_misfire_check
    CHECK (misfire IN ('run_once', 'skip', 'all'));
ALTER TABLE __SCHEMA__.jobs
    ADD COLUMN misfire_limit integer NOT NULL DEFAULT 100 CHECK (misfire_limit >= 1);
ALTER TABLE __SCHEMA__.actions DROP CONSTRAINT actions_action_check;
ALTER TABLE __SCHEMA__.actions ADD CONSTRAINT actions_action_check
    CHECK (action IN ('pause', 'resume', 'cancel', 'backfill'));
DROP INDEX __SCHEMA__.runs_one_pending_per_key;
CREATE UNIQUE INDEX runs_one_pending_per_key
    ON __SCHEMA__.runs (job, (coalesce(scope, '')))
    WHERE status = 'pending' AND source <> 'backfill';
CREATE INDEX runs_backfill_pending ON __SCHEMA__.runs (job, (coalesce(scope, '')), scheduled_for)
    WHERE status = 'pending' AND source = 'backfill';

-- claimable(), as in db/sql/schema/.
CREATE OR REPLACE FUNCTION __SCHEMA__.claimable(jobs text[]) RETURNS SETOF bigint
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

-- refuse_forged_cron_fire(), as in db/sql/schema/.
CREATE OR REPLACE FUNCTION __SCHEMA__.refuse_forged_cron_fire() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NOT has_table_privilege(session_user, '__SCHEMA__.jobs', 'UPDATE')
       AND NOT (NEW.source = 'backfill' AND has_function_privilege(
           session_user, '__SCHEMA__.backfill(text, text, timestamptz[], text, boolean)',
           'EXECUTE'))
    THEN
        RAISE EXCEPTION 'syncworker: scheduled_for is reserved for the worker''s cron fires'
            USING ERRCODE = '42501',
                  HINT = 'call trigger() without scheduled_for';
    END IF;
    RETURN NEW;
END
$fn$;

-- trigger(), as in db/sql/schema/.
CREATE OR REPLACE FUNCTION __SCHEMA__.trigger(
    job           text,
    scope         text DEFAULT NULL,
    source        text DEFAULT 'sql',
    triggered_by  text DEFAULT current_user,
    payload       jsonb DEFAULT '{}',
    scheduled_for timestamptz DEFAULT NULL,
    run_after     interval DEFAULT NULL
) RETURNS TABLE (run_id bigint, created boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    j          __SCHEMA__.jobs%ROWTYPE;
    one_scope  text;
    scope_list text[];
    reservable boolean;
    candidate  record;
    taker      text;
    delay      interval;
    start_at   timestamptz;
    waits      boolean;
    delayed    boolean := false;  -- a run made or joined waits for its not_before
    ready      boolean := false;  -- and one may start now
BEGIN
    IF trigger.job IS NULL THEN
        RAISE EXCEPTION 'syncworker: job must not be NULL' USING ERRCODE = '22004';
    END IF;
    SELECT * INTO j FROM __SCHEMA__.jobs WHERE name = trigger.job;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'syncworker: unknown job %', quote_literal(trigger.job)
            USING ERRCODE = '22023',
                  HINT = 'known jobs: ' || coalesce(
                      (SELECT string_agg(name, ', ' ORDER BY name) FROM __SCHEMA__.jobs), 'none');
    END IF;
    IF NOT j.enabled THEN
        RAISE EXCEPTION 'syncworker: job % is disabled', quote_literal(j.name) USING ERRCODE = '22023';
    END IF;
    IF trigger.payload IS NULL OR jsonb_typeof(trigger.payload) <> 'object' THEN
        RAISE EXCEPTION 'syncworker: payload must be a JSON object' USING ERRCODE = '22023';
    END IF;
    IF trigger.source = 'backfill' THEN
        -- Backfill runs queue apart, one per fire (backfill()): not for callers.
        RAISE EXCEPTION 'syncworker: source ''backfill'' is reserved for backfill()'
            USING ERRCODE = '22023';
    END IF;
    IF trigger.run_after < interval '0' THEN
        RAISE EXCEPTION 'syncworker: run_after must not be negative, got %', trigger.run_after
            USING ERRCODE = '22023';
    END IF;
    delay := greatest(
        trigger.run_after,
        CASE WHEN trigger.scheduled_for IS NULL AND j.debounce > 0
             THEN make_interval(secs => j.debounce) END);
    IF delay > interval '0' THEN
        start_at := now() + delay;
    END IF;

    IF j.scopes IS NULL THEN
        IF trigger.scope IS NOT NULL THEN
            RAISE EXCEPTION 'syncworker: job % has no scopes, but scope % was given',
                quote_literal(j.name), quote_literal(trigger.scope) USING ERRCODE = '22023';
        END IF;
        scope_list := ARRAY[NULL::text];
    ELSIF trigger.scope IS NULL THEN
        scope_list := j.scopes;
    ELSIF trigger.scope = ANY (j.scopes) THEN
        scope_list := ARRAY[trigger.scope];
    ELSE
        RAISE EXCEPTION 'syncworker: unknown scope % for job %',
            quote_literal(trigger.scope), quote_literal(j.name)
            USING ERRCODE = '22023', HINT = 'scopes: ' || array_to_string(j.scopes, ', ');
    END IF;

    reservable := cardinality(scope_list) = 1 AND trigger.payload = '{}'::jsonb
        AND start_at IS NULL
        AND current_setting('transaction_isolation') = 'read committed';

    FOREACH one_scope IN ARRAY scope_list LOOP
        IF trigger.scheduled_for IS NOT NULL AND EXISTS (
            SELECT 1 FROM __SCHEMA__.pauses h
            WHERE h.job = j.name AND (h.scope IS NULL OR h.scope = one_scope)
              -- held at the fire's time, however late the fire is handled
              AND h.paused_at <= trigger.scheduled_for
              AND (h.until IS NULL OR h.until > trigger.scheduled_for)
        ) THEN
            CONTINUE;
        END IF;
        IF j.on_overlap = 'skip' AND EXISTS (
            SELECT 1 FROM __SCHEMA__.runs r
            WHERE r.job = j.name AND r.scope IS NOT DISTINCT FROM one_scope AND r.status = 'running'
        ) THEN
            INSERT INTO __SCHEMA__.runs AS r
                (job, scope, status, source, triggered_by, payload, scheduled_for,
                 finished_at, duration_ms, max_attempts, error)
            VALUES (j.name, one_scope, 'skipped', trigger.source, trigger.triggered_by,
                    trigger.payload, trigger.scheduled_for, now(), 0, j.retries + 1,
                    'skipped: a run of this key was running (on_overlap = skip)')
            RETURNING r.id, true INTO run_id, created;
            RETURN NEXT;
            CONTINUE;
        END IF;

        -- One run, without a payload (its notification goes out on a channel
        -- any role may LISTEN to), of a key with nothing pending or running:
        -- reserved for a live worker that runs the job with a slot free,
        -- counting the runs it has and those reserved for it, the least busy
        -- first. The key's lock first: the reads below decide the write.
        taker := NULL;
        IF reservable THEN
            PERFORM pg_advisory_xact_lock(
                (__LOCK_NS__)::bigint << 32
                | (hashtext(j.name || E'\x1f' || coalesce(one_scope, '')) & 4294967295));
        END IF;
        IF reservable AND NOT EXISTS (
            SELECT 1 FROM __SCHEMA__.runs r
            WHERE r.job = j.name AND coalesce(r.scope, '') = coalesce(one_scope, '')
              AND r.status = 'running'
        ) AND NOT EXISTS (
            SELECT 1 FROM __SCHEMA__.runs r
            WHERE r.job = j.name AND coalesce(r.scope, '') = coalesce(one_scope, '')
              AND r.status = 'pending'
        ) AND NOT EXISTS (
            SELECT 1 FROM __SCHEMA__.pauses h
            WHERE h.job = j.name AND (h.scope IS NULL OR h.scope = one_scope)
              AND (h.until IS NULL OR h.until > now())
        ) THEN
            FOR candidate IN
                SELECT w.id, w.lock_key FROM __SCHEMA__.workers w
                WHERE w.state IN ('idle', 'running') AND w.first_steps ? j.name
                  AND w.reserve_by_id
                  -- Not one that has been silent long enough to be taken over.
                  AND (w.takeover_after IS NULL
                       OR w.heartbeat_at > now() - make_interval(secs => w.takeover_after))
                  AND w.concurrency > (
                      SELECT count(*) FROM __SCHEMA__.runs r
                      WHERE r.worker_id = w.id AND r.status = 'running')
                    + (SELECT count(*) FROM __SCHEMA__.runs r
                       WHERE r.reserved_for = w.id AND r.status = 'pending')
                ORDER BY w.state <> 'idle', w.heartbeat_at DESC
                LIMIT 3
            LOOP
                -- Alive: its session holds the liveness lock exclusively, so
                -- a shared try fails (and one that succeeds is let go at once).
                IF pg_try_advisory_lock_shared(__LOCK_NS__, candidate.lock_key) THEN
                    PERFORM pg_advisory_unlock_shared(__LOCK_NS__, candidate.lock_key);
                    CONTINUE;
                END IF;
                taker := candidate.id;
                EXIT;
            END LOOP;
        END IF;

        INSERT INTO __SCHEMA__.runs AS r
            (job, scope, status, source, triggered_by, payload, scheduled_for, max_attempts,
             reserved_for, not_before)
        VALUES (j.name, one_scope, 'pending', trigger.source, trigger.triggered_by,
                trigger.payload, trigger.scheduled_for, j.retries + 1, taker, start_at)
        ON CONFLICT (job, (coalesce(scope, ''))) WHERE status = 'pending' AND source <> 'backfill'
        DO UPDATE SET triggers = r.triggers + 1,
                      scheduled_for = coalesce(r.scheduled_for, excluded.scheduled_for),
                      not_before = greatest(r.not_before, excluded.not_before),
                      reserved_for = CASE WHEN excluded.not_before IS NULL
                                          THEN r.reserved_for END
        RETURNING r.id, (r.xmax = 0), coalesce(r.not_before > now(), false)
            INTO run_id, created, waits;
        RETURN NEXT;
        delayed := delayed OR waits;
        ready := ready OR NOT waits;

        IF taker IS NOT NULL AND created THEN
            -- A new run: its fields are the ones just inserted.
            -- Only whom it is for and which run: the worker reads the rest
            -- from the row its claim returns.
            PERFORM pg_notify(__WAKE__, json_build_object(
                'reserved_for', taker, 'id', run_id)::text);
            RETURN;
        END IF;
    END LOOP;

    -- Delivered at commit: workers wake only once the runs are visible.
    IF delayed THEN
        PERFORM pg_notify(__WAKE__, json_build_object('delayed', j.name)::text);
    END IF;
    IF ready OR NOT delayed THEN
        PERFORM pg_notify(__WAKE__, j.name);
    END IF;
END
$fn$;

-- trigger_and_claim(), as in db/sql/schema/.
CREATE OR REPLACE FUNCTION __SCHEMA__.trigger_and_claim(
    me           text,
    first_step   text,
    events       text,
    job          text,
    scope        text,
    source       text,
    triggered_by text,
    payload      jsonb
) RETURNS TABLE (run_id bigint, created boolean, step_id bigint, max_attempts integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    made    record;
    claimed __SCHEMA__.runs%ROWTYPE;
BEGIN
    -- The run, claimed, in one write. Only in the case trigger() would
    -- create a run for (an enabled job, a scope it names or none for a job
    -- without scopes, a JSON object, nothing of the key pending); anything
    -- else, errors included, is trigger()'s to handle.
    IF first_step IS NOT NULL AND jsonb_typeof(trigger_and_claim.payload) = 'object'
       AND current_setting('transaction_isolation') = 'read committed'
    THEN
        PERFORM pg_advisory_xact_lock(
            (__LOCK_NS__)::bigint << 32
            | (hashtext(trigger_and_claim.job || E'\x1f' || coalesce(trigger_and_claim.scope, ''))
               & 4294967295));
        INSERT INTO __SCHEMA__.runs AS r
            (job, scope, status, source, triggered_by, payload, max_attempts,
             attempt, started_at, worker_id, current_step)
        SELECT j.name, trigger_and_claim.scope, 'running', trigger_and_claim.source,
               trigger_and_claim.triggered_by, trigger_and_claim.payload, j.retries + 1,
               1, clock_timestamp(), me, first_step
        FROM __SCHEMA__.jobs j
        WHERE j.name = trigger_and_claim.job AND j.enabled AND j.debounce = 0
          AND trigger_and_claim.source <> 'backfill'  -- trigger() refuses it
          AND CASE WHEN j.scopes IS NULL THEN trigger_and_claim.scope IS NULL
                   ELSE trigger_and_claim.scope = ANY (j.scopes) END
          AND NOT EXISTS (
              SELECT 1 FROM __SCHEMA__.runs p
              WHERE p.job = j.name AND p.status = 'pending'
                AND coalesce(p.scope, '') = coalesce(trigger_and_claim.scope, ''))
          AND NOT EXISTS (
              SELECT 1 FROM __SCHEMA__.pauses h
              WHERE h.job = j.name
                AND (h.scope IS NULL OR h.scope = trigger_and_claim.scope)
                AND (h.until IS NULL OR h.until > now()))
        ON CONFLICT DO NOTHING  -- runs_one_running_per_key: the key is running
        RETURNING * INTO claimed;
        IF FOUND THEN
            INSERT INTO __SCHEMA__.run_steps (run_id, attempt, position, name, status)
            VALUES (claimed.id, claimed.attempt, 0, first_step, 'running')
            RETURNING id INTO step_id;
            PERFORM pg_notify(events, json_build_object(
                'event', 'run_started', 'run_id', claimed.id, 'job', claimed.job,
                'scope', claimed.scope, 'status', claimed.status)::text);
            run_id := claimed.id;
            created := true;
            max_attempts := claimed.max_attempts;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    FOR made IN
        SELECT * FROM __SCHEMA__.trigger(job, scope, source, triggered_by, payload)
    LOOP
        run_id := made.run_id;
        created := made.created;
        RETURN NEXT;
    END LOOP;
END
$fn$;

-- backfill(), new, as in db/sql/schema/.
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
