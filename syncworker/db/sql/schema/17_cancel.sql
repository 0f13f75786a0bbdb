-- cancel(run_id, reason, by, events): stop a pending or running run (011).
--
-- Returns the run's status after the request: a pending run is `cancelled`
-- at once (and its run_cancelled event published on `events`, the
-- channel's default name unless given); a running one stays `running` until
-- its owner stops it, told on the wake channel (`{"cancel": id}`,
-- events.py) and reading the request from cancels; a finished run is left
-- as it is. An unknown run is 22023. Recorded in actions. SECURITY DEFINER,
-- EXECUTE revoked from PUBLIC: granted per role (README "Operating").

CREATE FUNCTION __SCHEMA__.cancel(
    run_id bigint,
    reason text DEFAULT NULL,
    by     text DEFAULT NULL,
    events text DEFAULT 'sync_events'
) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    r     __SCHEMA__.runs%ROWTYPE;
    actor text := session_user::text;  -- the record names the role, whatever `by` says
    asker text := coalesce(cancel.by, session_user::text);
    why   text;
BEGIN
    SELECT * INTO r FROM __SCHEMA__.runs WHERE id = cancel.run_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'syncworker: unknown run %', coalesce(cancel.run_id::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF r.status NOT IN ('pending', 'running') THEN
        RETURN r.status;  -- finished: nothing to stop, nothing changed
    END IF;
    why := 'cancelled by ' || asker || coalesce(': ' || cancel.reason, '');
    INSERT INTO __SCHEMA__.cancels (run_id, requested_by, reason)
    VALUES (r.id, asker, cancel.reason)
    ON CONFLICT (run_id) DO NOTHING;
    INSERT INTO __SCHEMA__.actions (actor, action, job, scope, run_id, detail)
    VALUES (actor, 'cancel', r.job, r.scope, r.id,
            json_build_object('reason', cancel.reason, 'status', r.status,
                              'by', cancel.by)::jsonb);
    IF r.status = 'pending' THEN
        UPDATE __SCHEMA__.runs
        SET status = 'cancelled', finished_at = now(), duration_ms = 0, error = why,
            reserved_for = NULL
        WHERE id = r.id;
        PERFORM pg_notify(cancel.events, json_build_object(
            'event', 'run_cancelled', 'run_id', r.id, 'job', r.job, 'scope', r.scope,
            'status', 'cancelled')::text);
        RETURN 'cancelled';
    END IF;
    PERFORM pg_notify(__WAKE__, json_build_object('cancel', r.id)::text);
    RETURN 'running';
END
$fn$;

REVOKE EXECUTE ON FUNCTION __SCHEMA__.cancel(bigint, text, text, text) FROM PUBLIC;
