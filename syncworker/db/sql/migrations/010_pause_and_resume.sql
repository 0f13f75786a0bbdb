-- syncworker schema, version 10: pause and resume.
--
-- An operator holds a job, or one scope of it, from SQL (pause(), resume()),
-- the CLI or Python, and every worker obeys at once: the hold is a row of
-- pauses, tested by every claim in the statement that takes the run
-- (claimable(), trigger_and_claim(), a reservation's claim), by trigger()'s
-- reservation, and by trigger() for cron fires, which make no run while the
-- key is held. Each pause and resume is recorded in actions. An existing
-- install sees two new tables and two new functions, the app roles nothing
-- until granted (README "Operating"). Workers of version 9 still running in
-- a rolling upgrade claim through the same functions, so they obey holds
-- too; they do not wake when one ends (a version-10 worker does).
-- CREATE OR REPLACE keeps a function's grants; a new function (or a new
-- signature) is executable by PUBLIC until revoked here (see 002).

CREATE TABLE __SCHEMA__.pauses (
    job        text NOT NULL,
    scope      text,  -- NULL: the whole job
    paused_at  timestamptz NOT NULL DEFAULT now(),
    paused_by  text NOT NULL,
    reason     text,
    until      timestamptz  -- NULL: until resume()
);
CREATE UNIQUE INDEX pauses_one_per_key ON __SCHEMA__.pauses (job, (coalesce(scope, '')));

CREATE TABLE __SCHEMA__.actions (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL CHECK (action IN ('pause', 'resume')),
    job     text NOT NULL,
    scope   text,
    detail  jsonb NOT NULL DEFAULT '{}'
);

-- Only the owner, whatever default privileges would give: operators act
-- through pause() and resume(). Then a hold is as visible as its job: every
-- role that may read jobs (README "Least-privilege roles") may read pauses,
-- so its `status` keeps working and a UI can show what is held.
DO $m$
DECLARE
    object regclass;
    holder record;
    reader record;
BEGIN
    FOREACH object IN ARRAY ARRAY['__SCHEMA__.pauses', '__SCHEMA__.actions']::regclass[] LOOP
        FOR holder IN
            SELECT DISTINCT a.grantee FROM pg_class c, aclexplode(c.relacl) a
            WHERE c.oid = object AND a.grantee <> c.relowner
        LOOP
            EXECUTE format('REVOKE ALL ON %s FROM %s', object,
                           CASE WHEN holder.grantee = 0 THEN 'PUBLIC'
                                ELSE holder.grantee::regrole::text END);
        END LOOP;
    END LOOP;
    FOR reader IN
        SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                             ELSE a.grantee::regrole::text END AS role
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = '__SCHEMA__.jobs'::regclass AND a.privilege_type = 'SELECT'
          AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT SELECT ON __SCHEMA__.pauses TO %s', reader.role);
    END LOOP;
END
$m$;

-- claimable(), as in db/sql/schema/.
CREATE OR REPLACE FUNCTION __SCHEMA__.claimable(jobs text[]) RETURNS SETOF bigint
LANGUAGE sql
ROWS 1
SET enable_sort = off
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT p.id FROM __SCHEMA__.runs p
    WHERE p.status = 'pending' AND p.job = ANY(jobs) AND p.reserved_for IS NULL
      AND NOT EXISTS (
          SELECT 1 FROM __SCHEMA__.runs x
          WHERE x.status = 'running' AND x.job = p.job
            AND coalesce(x.scope, '') = coalesce(p.scope, ''))
      AND NOT EXISTS (
          SELECT 1 FROM __SCHEMA__.pauses h
          WHERE h.job = p.job AND (h.scope IS NULL OR h.scope = p.scope)
            AND (h.until IS NULL OR h.until > now()))
    ORDER BY p.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
$fn$;

-- trigger(), as in db/sql/schema/.
CREATE OR REPLACE FUNCTION __SCHEMA__.trigger(
    job           text,
    scope         text DEFAULT NULL,
    source        text DEFAULT 'sql',
    triggered_by  text DEFAULT current_user,
    payload       jsonb DEFAULT '{}',
    scheduled_for timestamptz DEFAULT NULL
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
             reserved_for)
        VALUES (j.name, one_scope, 'pending', trigger.source, trigger.triggered_by,
                trigger.payload, trigger.scheduled_for, j.retries + 1, taker)
        ON CONFLICT (job, (coalesce(scope, ''))) WHERE status = 'pending'
        DO UPDATE SET triggers = r.triggers + 1,
                      scheduled_for = coalesce(r.scheduled_for, excluded.scheduled_for)
        RETURNING r.id, (r.xmax = 0) INTO run_id, created;
        RETURN NEXT;

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
    PERFORM pg_notify(__WAKE__, j.name);
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
        WHERE j.name = trigger_and_claim.job AND j.enabled
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

-- pause(), new, as in db/sql/schema/.
CREATE FUNCTION __SCHEMA__.pause(
    job    text,
    scope  text DEFAULT NULL,
    until  timestamptz DEFAULT NULL,
    reason text DEFAULT NULL,
    by     text DEFAULT NULL
) RETURNS __SCHEMA__.pauses
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    j     __SCHEMA__.jobs%ROWTYPE;
    held  __SCHEMA__.pauses%ROWTYPE;
    actor text := session_user::text;  -- the record names the role, whatever `by` says
    asker text := coalesce(pause.by, session_user::text);
BEGIN
    SELECT * INTO j FROM __SCHEMA__.jobs WHERE name = pause.job;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'syncworker: unknown job %', quote_literal(coalesce(pause.job, 'NULL'))
            USING ERRCODE = '22023',
                  HINT = 'known jobs: ' || coalesce(
                      (SELECT string_agg(name, ', ' ORDER BY name) FROM __SCHEMA__.jobs), 'none');
    END IF;
    IF pause.scope IS NOT NULL AND (j.scopes IS NULL OR NOT pause.scope = ANY (j.scopes)) THEN
        RAISE EXCEPTION 'syncworker: unknown scope % for job %',
            quote_literal(pause.scope), quote_literal(j.name)
            USING ERRCODE = '22023',
                  HINT = coalesce('scopes: ' || array_to_string(j.scopes, ', '),
                                  'the job has no scopes');
    END IF;
    IF pause.until IS NOT NULL
       AND (NOT isfinite(pause.until) OR pause.until >= '10000-01-01 00:00+00') THEN
        RAISE EXCEPTION 'syncworker: until % is too far: give a time before the year 10000',
            pause.until USING ERRCODE = '22023';
    END IF;
    IF pause.until IS NOT NULL AND pause.until <= now() THEN
        RAISE EXCEPTION 'syncworker: until % is not in the future', pause.until
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO __SCHEMA__.pauses AS p (job, scope, paused_by, reason, until)
    VALUES (j.name, pause.scope, asker, pause.reason, pause.until)
    ON CONFLICT (job, (coalesce(scope, '')))
    DO UPDATE SET paused_at = now(), paused_by = excluded.paused_by,
                  reason = excluded.reason, until = excluded.until
    RETURNING * INTO held;
    INSERT INTO __SCHEMA__.actions (actor, action, job, scope, detail)
    VALUES (actor, 'pause', j.name, pause.scope,
            json_build_object('until', pause.until, 'reason', pause.reason,
                              'by', pause.by)::jsonb);
    PERFORM pg_notify(__WAKE__, json_build_object('pause', j.name)::text);
    RETURN held;
END
$fn$;

REVOKE EXECUTE ON FUNCTION __SCHEMA__.pause(text, text, timestamptz, text, text) FROM PUBLIC;

-- resume(), new, as in db/sql/schema/.
CREATE FUNCTION __SCHEMA__.resume(
    job   text,
    scope text DEFAULT NULL,
    by    text DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    j      __SCHEMA__.jobs%ROWTYPE;
    actor  text := session_user::text;
    lifted boolean;
BEGIN
    SELECT * INTO j FROM __SCHEMA__.jobs WHERE name = resume.job;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'syncworker: unknown job %', quote_literal(coalesce(resume.job, 'NULL'))
            USING ERRCODE = '22023',
                  HINT = 'known jobs: ' || coalesce(
                      (SELECT string_agg(name, ', ' ORDER BY name) FROM __SCHEMA__.jobs), 'none');
    END IF;
    IF resume.scope IS NOT NULL AND (j.scopes IS NULL OR NOT resume.scope = ANY (j.scopes)) THEN
        RAISE EXCEPTION 'syncworker: unknown scope % for job %',
            quote_literal(resume.scope), quote_literal(j.name)
            USING ERRCODE = '22023',
                  HINT = coalesce('scopes: ' || array_to_string(j.scopes, ', '),
                                  'the job has no scopes');
    END IF;
    WITH gone AS (
        DELETE FROM __SCHEMA__.pauses p
        WHERE p.job = j.name AND coalesce(p.scope, '') = coalesce(resume.scope, '')
        RETURNING p.until
    )
    SELECT coalesce(bool_or(g.until IS NULL OR g.until > now()), false) INTO lifted FROM gone g;
    INSERT INTO __SCHEMA__.actions (actor, action, job, scope, detail)
    VALUES (actor, 'resume', j.name, resume.scope,
            json_build_object('lifted', lifted, 'by', resume.by)::jsonb);
    PERFORM pg_notify(__WAKE__, json_build_object('pause', j.name)::text);
    PERFORM pg_notify(__WAKE__, j.name);
    RETURN lifted;
END
$fn$;

REVOKE EXECUTE ON FUNCTION __SCHEMA__.resume(text, text, text) FROM PUBLIC;
