-- syncworker schema, version 6: a trigger writes its run once where version 5
-- wrote it two or three times.
--
-- Every change of a run's status or reservation is a new row version with an
-- entry in each of the table's indexes (the columns are in their predicates,
-- so PostgreSQL cannot update in place). Version 5's trigger() inserted the
-- run, then updated it to reserve it; trigger_and_claim() updated it once
-- more to claim it. Those writes were most of the time a NOTIFY took to reach
-- its step: 0.6 ms of the call's 1.0 ms round trip.
--
-- trigger() now chooses the worker before the insert and writes the run
-- reserved; trigger_and_claim() inserts the run already `running` for the
-- calling worker. Both decide on what they read before writing, so both take
-- a transaction lock on the key first: of two deciding on one key, the second
-- reads after the first commits. Without it, a reservation could be made
-- while another run of the key was being started, and the reserved worker,
-- which starts the step before its claim is in, would run the key twice. The
-- lock is on the key alone (scopes_sql jobs can have thousands of keys; only
-- single-key calls take it), in the 64-bit advisory space, apart from the
-- liveness locks' pairs of 32-bit keys; its high half is this schema's
-- namespace.
--
-- Under REPEATABLE READ or SERIALIZABLE a statement reads the transaction's
-- first snapshot, older than the lock, so neither shortcut is taken there:
-- the run is written `pending` and claimed, as any run.
--
-- The `syncworker.prefer` setting of version 5 is gone: trigger_and_claim()
-- no longer goes through a reservation.

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
        ) THEN
            FOR candidate IN
                SELECT w.id, w.lock_key FROM __SCHEMA__.workers w
                WHERE w.state IN ('idle', 'running') AND w.first_steps ? j.name
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
            PERFORM pg_notify(__WAKE__, json_build_object(
                'reserved_for', taker, 'id', run_id, 'job', j.name, 'scope', one_scope,
                'source', trigger.source, 'triggered_by', trigger.triggered_by,
                'scheduled_for', trigger.scheduled_for, 'attempt', 0,
                'max_attempts', j.retries + 1)::text);
            RETURN;
        END IF;
    END LOOP;

    -- Delivered at commit: workers wake only once the runs are visible.
    PERFORM pg_notify(__WAKE__, j.name);
END
$fn$;

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
