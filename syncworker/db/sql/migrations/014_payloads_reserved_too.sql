-- syncworker schema, version 14: a trigger with a payload is reserved for an
-- idle worker like one without.
--
-- A payload kept trigger() from reserving its run since version 5, when the
-- reservation's notification carried the payload and any role may LISTEN to
-- the wake channel. Since version 7 that notification names only the worker
-- and the run, and the worker reads the payload from the row its claim
-- returns, so the reason is gone; runs with a payload took the slower path
-- (every worker woken, a claim each) for nothing. An existing install sees
-- trigger() replaced, grants kept (CREATE OR REPLACE). Workers of version 13
-- still running claim such reservations as any other.

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
    IF trigger.run_after > interval '3650 days' THEN
        -- As for pauses; and now() + it must stay a time every worker can read.
        RAISE EXCEPTION 'syncworker: run_after % is too long: at most 3650 days',
            trigger.run_after USING ERRCODE = '22023';
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

    reservable := cardinality(scope_list) = 1 AND start_at IS NULL
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

        -- One run of a key with nothing pending or running: reserved for a
        -- live worker that runs the job with a slot free, counting the runs
        -- it has and those reserved for it, the least busy first. The key's
        -- lock first: the reads below decide the write.
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
                      -- A cron fire is due now: it waits for no delay.
                      not_before = CASE WHEN excluded.scheduled_for IS NULL
                                        THEN greatest(r.not_before, excluded.not_before) END,
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
