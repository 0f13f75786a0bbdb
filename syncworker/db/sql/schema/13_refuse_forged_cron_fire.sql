-- refuse_forged_cron_fire() and its trigger: only the worker may name a cron
-- fire (003), and a role granted backfill() the fires it backfills (013).
--
-- scheduled_for marks a run as the run of one cron fire, and
-- runs_one_per_cron_fire lets each fire run once; an app that passed a future
-- fire's time would take that fire's slot. The worker owns the schema and so
-- may update jobs; an app role may not, which is the test (session_user:
-- inside the SECURITY DEFINER trigger() current_user is the owner). BEFORE
-- INSERT sees the row trigger() proposes before ON CONFLICT merges it into a
-- pending run, so the join path is covered too, and the WHEN clause makes it
-- free for runs without scheduled_for. A backfill run (source 'backfill',
-- which trigger() refuses and only backfill() writes) passes for a role that
-- may execute backfill(). EXECUTE stays with PUBLIC, as 003 left it: a
-- trigger function runs whoever inserts.

CREATE FUNCTION __SCHEMA__.refuse_forged_cron_fire() RETURNS trigger
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

CREATE TRIGGER runs_cron_fire_by_worker_only
    BEFORE INSERT ON __SCHEMA__.runs
    FOR EACH ROW WHEN (NEW.scheduled_for IS NOT NULL)
    EXECUTE FUNCTION __SCHEMA__.refuse_forged_cron_fire();
