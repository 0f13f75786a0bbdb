-- syncworker schema, version 5: trigger() reserves a new run for an idle
-- worker, which starts it on the notification instead of claiming it first.
--
-- Before, a trigger reached its step through three hops in turn: the caller's
-- trigger() call, the wake notification, and the worker's claim. The claim,
-- a round trip of its own, was the largest. Now, when the call creates one
-- run, no run of that key is running, and a live worker that runs the job
-- has a free slot, the run is
-- written `pending` with reserved_for = that worker, and the wake
-- notification carries the run. The worker starts the step at once and writes
-- the claim (the same write as before, fenced on the reservation) alongside;
-- nothing else is written for the run until the claim is in.
--
-- No worker claims a reserved run (claimable), so the one-running-per-key
-- rule holds as before: only the reserved worker may start it. A worker that
-- cannot take it (busy, draining, job unknown) clears the reservation and
-- wakes the others, and so does a worker that reconnects, for reservations
-- whose notification it may have missed, and one that drains or stops. Orphan
-- recovery clears the reservations of a worker that died.
--
-- A reservation holds no lock: it is a column of the caller's new row, seen
-- by others (and notified) at the caller's commit. If the caller's
-- transaction stays open for long, the worker it named may be busy or gone by
-- then; it releases the run, or recovery clears the reservation, as above.

ALTER TABLE __SCHEMA__.runs ADD COLUMN reserved_for text;
CREATE INDEX runs_reserved ON __SCHEMA__.runs (reserved_for) WHERE reserved_for IS NOT NULL;
CREATE INDEX runs_running_by_worker ON __SCHEMA__.runs (worker_id) WHERE status = 'running';

-- What a worker offers: how many runs it may run at once, and the first step
-- of each job it runs (the step the reservation's claim records). NULL
-- first_steps: it takes no reservations (a worker of an older version).
ALTER TABLE __SCHEMA__.workers
    ADD COLUMN concurrency integer NOT NULL DEFAULT 0,
    ADD COLUMN first_steps jsonb;

-- No worker claims a reserved run: the reserved worker starts it from the
-- notification, or releases it (then anyone may claim it). Old workers in a
-- rolling upgrade call this same function.
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
    ORDER BY p.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
$fn$;

-- The same validation, coalescing and results as version 1; new is the
-- reservation after the insert. CREATE OR REPLACE keeps the grants of 002.
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
    taker      record;
    new_run    __SCHEMA__.runs%ROWTYPE;
    reservable boolean;
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

    -- One run. Its notification goes out on a channel any role may LISTEN
    -- to, so a run with a payload is reserved only for the worker calling
    -- (trigger_and_claim, which sends none): the payload stays in the table.
    reservable := cardinality(scope_list) = 1;

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

        INSERT INTO __SCHEMA__.runs AS r
            (job, scope, status, source, triggered_by, payload, scheduled_for, max_attempts)
        VALUES (j.name, one_scope, 'pending', trigger.source, trigger.triggered_by,
                trigger.payload, trigger.scheduled_for, j.retries + 1)
        ON CONFLICT (job, (coalesce(scope, ''))) WHERE status = 'pending'
        DO UPDATE SET triggers = r.triggers + 1,
                      scheduled_for = coalesce(r.scheduled_for, excluded.scheduled_for)
        RETURNING r.id, (r.xmax = 0) INTO run_id, created;
        RETURN NEXT;

        IF reservable AND created AND NOT EXISTS (
            SELECT 1 FROM __SCHEMA__.runs r
            WHERE r.job = j.name AND coalesce(r.scope, '') = coalesce(one_scope, '')
              AND r.status = 'running'
        ) THEN
            -- A live worker that runs the job with a slot free, counting the
            -- runs it has and those reserved for it; the least busy first.
            FOR taker IN
                SELECT w.id, w.lock_key FROM __SCHEMA__.workers w
                WHERE w.state IN ('idle', 'running') AND w.first_steps ? j.name
                  AND (trigger.payload = '{}'::jsonb
                       OR w.id = current_setting('syncworker.prefer', true))
                  AND w.concurrency > (
                      SELECT count(*) FROM __SCHEMA__.runs r
                      WHERE r.worker_id = w.id AND r.status = 'running')
                    + (SELECT count(*) FROM __SCHEMA__.runs r
                       WHERE r.reserved_for = w.id AND r.status = 'pending')
                ORDER BY w.id = current_setting('syncworker.prefer', true) DESC NULLS LAST,
                         w.state <> 'idle', w.heartbeat_at DESC
                LIMIT 3
            LOOP
                -- Alive: its session holds the liveness lock exclusively, so
                -- a shared try fails (and one that succeeds is let go at once).
                IF pg_try_advisory_lock_shared(__LOCK_NS__, taker.lock_key) THEN
                    PERFORM pg_advisory_unlock_shared(__LOCK_NS__, taker.lock_key);
                    CONTINUE;
                END IF;
                UPDATE __SCHEMA__.runs r SET reserved_for = taker.id
                WHERE r.id = run_id RETURNING * INTO new_run;
                IF taker.id = current_setting('syncworker.prefer', true) THEN
                    RETURN;  -- the calling worker claims it in this transaction
                END IF;
                PERFORM pg_notify(__WAKE__, json_build_object(
                    'reserved_for', taker.id, 'id', new_run.id, 'job', new_run.job,
                    'scope', new_run.scope, 'source', new_run.source,
                    'triggered_by', new_run.triggered_by,
                    'scheduled_for', new_run.scheduled_for, 'attempt', new_run.attempt,
                    'max_attempts', new_run.max_attempts)::text);
                RETURN;
            END LOOP;
        END IF;
    END LOOP;

    -- Delivered at commit: workers wake only once the runs are visible.
    PERFORM pg_notify(__WAKE__, j.name);
END
$fn$;

-- A worker enqueueing a NOTIFY trigger: trigger(), preferring this worker
-- for the reservation and claiming the run here when it gets it, so that the
-- worker starts the step on this call's answer (one round trip after the
-- NOTIFY, not a notification back to itself first). `first_step` NULL: the
-- worker has no free slot, and trigger() chooses as for any caller.
CREATE FUNCTION __SCHEMA__.trigger_and_claim(
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
    PERFORM set_config('syncworker.prefer', CASE WHEN first_step IS NULL THEN '' ELSE me END, true);
    FOR made IN
        SELECT * FROM __SCHEMA__.trigger(job, scope, source, triggered_by, payload)
    LOOP
        run_id := made.run_id;
        created := made.created;
        step_id := NULL;
        max_attempts := NULL;
        IF first_step IS NOT NULL AND made.created THEN
            UPDATE __SCHEMA__.runs AS r
            SET status = 'running', started_at = clock_timestamp(), worker_id = me,
                attempt = r.attempt + 1, reserved_for = NULL, current_step = first_step
            WHERE r.id = made.run_id AND r.status = 'pending' AND r.reserved_for = me
            RETURNING * INTO claimed;
            IF FOUND THEN
                INSERT INTO __SCHEMA__.run_steps (run_id, attempt, position, name, status)
                VALUES (claimed.id, claimed.attempt, 0, first_step, 'running')
                RETURNING id INTO step_id;
                max_attempts := claimed.max_attempts;
                PERFORM pg_notify(events, json_build_object(
                    'event', 'run_started', 'run_id', claimed.id, 'job', claimed.job,
                    'scope', claimed.scope, 'status', claimed.status)::text);
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
    PERFORM set_config('syncworker.prefer', '', true);
END
$fn$;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.trigger_and_claim(
    text, text, text, text, text, text, text, jsonb) FROM PUBLIC;
