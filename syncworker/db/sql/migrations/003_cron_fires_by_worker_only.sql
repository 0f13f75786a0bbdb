-- syncworker schema, version 3: only the worker may name a cron fire.
--
-- scheduled_for marks a run as the run of one cron fire, and
-- runs_one_per_cron_fire lets each fire run once. trigger() takes it as a
-- parameter because the worker enqueues its fires through trigger() too, but
-- an app that passed a future fire's time would take that fire's slot and the
-- real fire would be refused. The worker owns the schema and so may update
-- jobs; an app role may not. The check looks at session_user because inside
-- the SECURITY DEFINER trigger() current_user is the owner.
--
-- A BEFORE INSERT trigger sees the row trigger() proposes before ON CONFLICT
-- merges it into a pending run, so the join path is covered as well, and it
-- costs nothing for runs without scheduled_for (the WHEN clause).

CREATE FUNCTION __SCHEMA__.refuse_forged_cron_fire() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NOT has_table_privilege(session_user, '__SCHEMA__.jobs', 'UPDATE') THEN
        RAISE EXCEPTION 'syncworker: scheduled_for is reserved for the worker''s cron fires'
            USING ERRCODE = '42501',
                  HINT = 'call trigger() without scheduled_for';
    END IF;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER runs_cron_fire_by_worker_only
    BEFORE INSERT ON __SCHEMA__.runs
    FOR EACH ROW WHEN (NEW.scheduled_for IS NOT NULL)
    EXECUTE FUNCTION __SCHEMA__.refuse_forged_cron_fire();
