-- syncworker schema, version 2: only roles granted EXECUTE may call trigger().
--
-- PostgreSQL grants EXECUTE on every new function to PUBLIC. trigger() is
-- SECURITY DEFINER: it writes runs with its owner's rights, so whoever may
-- call it can enqueue work. Under version 1 the only gate was USAGE on the
-- schema, and a role given USAGE just to read the tables (a dashboard) could
-- request runs as well. From this version a caller needs
-- GRANT EXECUTE ON FUNCTION __SCHEMA__.trigger(...) (README, "Least-privilege roles").
--
-- The upgrade does not lock out apps that relied on the default: every role
-- holding USAGE on the schema now is granted EXECUTE explicitly before PUBLIC
-- loses it. If PUBLIC itself holds USAGE, anyone was meant to call trigger(),
-- and the default is left in place (with a notice).
--
-- For later migrations: CREATE OR REPLACE keeps a function's grants, but a
-- new function (or trigger() dropped and created with a new signature) is
-- executable by PUBLIC again and must be revoked in the same migration.

DO $m$
DECLARE
    fn     regprocedure := '__SCHEMA__.trigger(text, text, text, text, jsonb, timestamptz)';
    caller regrole;
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_namespace n, aclexplode(n.nspacl) a
        WHERE n.oid = '__SCHEMA__'::regnamespace AND a.grantee = 0 AND a.privilege_type = 'USAGE'
    ) THEN
        RAISE NOTICE 'syncworker: PUBLIC has USAGE on schema %; % stays executable by PUBLIC',
            '__SCHEMA__'::regnamespace, fn;
        RETURN;
    END IF;
    FOR caller IN
        SELECT DISTINCT a.grantee::regrole
        FROM pg_namespace n, aclexplode(n.nspacl) a
        WHERE n.oid = '__SCHEMA__'::regnamespace AND a.privilege_type = 'USAGE'
          AND a.grantee <> 0
          AND a.grantee <> (SELECT p.proowner FROM pg_proc p WHERE p.oid = fn)
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', fn, caller);
    END LOOP;
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', fn);
END
$m$;
