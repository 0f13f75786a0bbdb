-- payload_grants and run_payloads: which roles may read which keys' payloads (007).
--
-- A payload is where callers put per-tenant data, so reading runs does not
-- show it: the app reads payloads through the view run_payloads, which shows
-- the runs of the (job, scope) pairs listed for one of its roles in
-- payload_grants (scope NULL: every scope of the job, and its unscoped runs).
-- The view is owned by the worker and reads runs with its rights;
-- security_barrier keeps a caller's own conditions (a leaky function in its
-- WHERE) from seeing rows before the grant filter. A role matches by name and
-- by inheritance; a row naming a role that does not exist matches nobody.
-- Both objects are the owner's alone (INSERT on payload_grants is a grant of
-- every payload); 007 revokes whatever default privileges gave, and the
-- README grants SELECT on run_payloads.

CREATE TABLE __SCHEMA__.payload_grants (
    grantee    name NOT NULL,
    job        text NOT NULL,
    scope      text,  -- NULL: every scope of the job, and its unscoped runs
    granted_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX payload_grants_one_per_key
    ON __SCHEMA__.payload_grants (grantee, job, (coalesce(scope, '')));

CREATE VIEW __SCHEMA__.run_payloads WITH (security_barrier) AS
SELECT r.id AS run_id, r.job, r.scope, r.payload
FROM __SCHEMA__.runs r
WHERE EXISTS (
    SELECT 1
    FROM __SCHEMA__.payload_grants g
    JOIN pg_catalog.pg_roles gr ON gr.rolname = g.grantee
    WHERE g.job = r.job AND (g.scope IS NULL OR g.scope = r.scope)
      AND pg_catalog.pg_has_role(current_user, gr.oid, 'USAGE'));
