-- syncworker schema, version 11: cancel a pending or running run.
--
-- cancel(run_id, reason) records the request in cancels and actions. A
-- pending run is cancelled there and then; a running one is stopped by its
-- owner, told on the wake channel, which ends it `cancelled` and never
-- retries it; orphan recovery (a query of the worker's, not a function)
-- reads cancels too, so a run whose owner died after the request is not
-- resurrected. An existing install sees one new table, one new function
-- (no role may call it until granted: README "Operating") and a new kind of
-- action. Workers of version 10 still running in a rolling upgrade ignore
-- the wake (their runs finish as usual, and their recovery retries a
-- cancelled run: upgrade every worker before relying on cancel).
-- CREATE OR REPLACE keeps a function's grants; a new function (or a new
-- signature) is executable by PUBLIC until revoked here (see 002).

CREATE TABLE __SCHEMA__.cancels (
    run_id        bigint PRIMARY KEY,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    requested_by  text NOT NULL,
    reason        text
);

ALTER TABLE __SCHEMA__.actions ADD COLUMN run_id bigint;
ALTER TABLE __SCHEMA__.actions DROP CONSTRAINT actions_action_check;
ALTER TABLE __SCHEMA__.actions
    ADD CONSTRAINT actions_action_check CHECK (action IN ('pause', 'resume', 'cancel'));

-- Only the owner, whatever default privileges would give.
DO $m$
DECLARE
    holder record;
BEGIN
    FOR holder IN
        SELECT DISTINCT a.grantee FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = '__SCHEMA__.cancels'::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('REVOKE ALL ON __SCHEMA__.cancels FROM %s',
                       CASE WHEN holder.grantee = 0 THEN 'PUBLIC'
                            ELSE holder.grantee::regrole::text END);
    END LOOP;
END
$m$;

-- cancel(), new, as in db/sql/schema/.
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
