-- trigger_and_claim(me, first_step, events, job, scope, source,
-- triggered_by, payload): trigger() for a worker that heard the NOTIFY (005,
-- 006, 010, 012).
--
-- When the calling worker has a free slot (first_step given) and trigger()
-- would create a run that may start now (an enabled job without a
-- debounce, a scope it names or none for a job without scopes, a JSON
-- object, nothing of the key pending, the key not held by a pause in
-- force), the run is
-- inserted already `running` for it, with its first step's row and its
-- run_started event, under the key's transaction lock: the worker starts the
-- step on this call's answer, one round trip after the NOTIFY. Anything
-- else, errors included, is trigger()'s. step_id and max_attempts are set
-- only for the run claimed here. A request with a delay of its own
-- (run_after) is trigger()'s alone: the worker calls that. Only the worker
-- calls it.

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

REVOKE EXECUTE ON FUNCTION __SCHEMA__.trigger_and_claim(
    text, text, text, text, text, text, text, jsonb) FROM PUBLIC;
