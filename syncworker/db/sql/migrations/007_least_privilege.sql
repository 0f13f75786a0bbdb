-- syncworker schema, version 7: a role that may read runs does not thereby
-- read every tenant's payload, nor the workers' hostnames and pids, and no
-- notification carries what such a role may not read.
--
-- Payloads. A payload is where callers put per-tenant data (tokens, ids), and
-- the documented app grant, SELECT on runs, showed every scope's. From this
-- version the app is granted SELECT on every column of runs but `payload`
-- (README, "Least-privilege roles"), and reads payloads through the view
-- run_payloads, which shows the runs of the (job, scope) pairs listed for one
-- of its roles in payload_grants (scope NULL: every scope of the job, and the
-- job's unscoped runs). The view is owned by the worker and reads runs with
-- its rights; security_barrier keeps a caller's own conditions (a leaky
-- function in its WHERE) from seeing rows before the grant filter. A role is
-- matched by name and by inheritance (pg_has_role ... 'USAGE', as for
-- privileges); a row naming a role that does not exist matches nobody.
--
-- The upgrade converts grants made before it: every role other than the
-- owner (PUBLIC included) that holds table-level SELECT on runs loses it and
-- is granted SELECT on each column but payload instead, with the grant option
-- if it had it (like 002 did for EXECUTE on trigger()). Those grants are
-- collected first and revoked with CASCADE, so grants a reader passed on are
-- converted as well. For later migrations: a column added to runs is readable
-- by no one but the owner until granted; grant it to the roles that may read
-- the other columns in the same migration.
--
-- Worker ids. A worker's id was host:pid:random, and runs.worker_id showed it
-- to anyone reading runs. Workers of this version use an opaque id; hostname
-- and pid stay in workers, which the app is not granted. The ids of earlier
-- workers are replaced in the rows of finished runs and stopped workers by a
-- pseudonym (a salted hash, so that it cannot be reversed to the host and pid,
-- the same for every row of one worker, so history still groups by worker).
-- Runs still pending or running keep theirs: a live worker of the previous
-- version fences its writes on its id.
--
-- Notifications. The wake channel may be LISTENed to by any role that can
-- connect. A reservation's notification named the run's job, scope, source
-- and triggered_by; it now carries only whom it is for and which run, and the
-- worker reads everything else from the row its claim returns. A worker of
-- an earlier version needs the rest, so trigger() reserves only for workers
-- that say they claim a reservation from its row (workers.reserve_by_id);
-- the others claim runs as before, and a rolling upgrade strands no run.
-- Run events were and stay {event, run_id, job, scope, status} (run_progress
-- adds the step and the counters), all of them readable from runs.

ALTER TABLE __SCHEMA__.workers ADD COLUMN reserve_by_id boolean NOT NULL DEFAULT false;

-- Version 6's trigger(), reserving only for workers that read the row, and
-- with a notification of two fields. CREATE OR REPLACE keeps the grants of 002.
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
                  AND w.reserve_by_id
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
            -- Only whom it is for and which run: the worker reads the rest
            -- from the row its claim returns.
            PERFORM pg_notify(__WAKE__, json_build_object(
                'reserved_for', taker, 'id', run_id)::text);
            RETURN;
        END IF;
    END LOOP;

    -- Delivered at commit: workers wake only once the runs are visible.
    PERFORM pg_notify(__WAKE__, j.name);
END
$fn$;

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

DO $m$
DECLARE
    runs     regclass := '__SCHEMA__.runs';
    columns  text;
    reader   record;
    roles    text[] := '{}';
    options  boolean[] := '{}';
    i        integer;
    salt     text := pg_catalog.gen_random_uuid()::text;
    object   regclass;
    holder   record;
BEGIN
    -- New objects: only the owner, whatever default privileges would give
    -- (INSERT on payload_grants is a grant of every payload). The README
    -- grants SELECT on run_payloads.
    FOREACH object IN ARRAY
        ARRAY['__SCHEMA__.payload_grants', '__SCHEMA__.run_payloads']::regclass[]
    LOOP
        FOR holder IN
            SELECT DISTINCT a.grantee FROM pg_class c, aclexplode(c.relacl) a
            WHERE c.oid = object AND a.grantee <> c.relowner
        LOOP
            EXECUTE format('REVOKE ALL ON %s FROM %s', object,
                           CASE WHEN holder.grantee = 0 THEN 'PUBLIC'
                                ELSE holder.grantee::regrole::text END);
        END LOOP;
    END LOOP;

    -- Table-level SELECT on runs becomes SELECT on every column but payload.
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO columns
    FROM pg_attribute a
    WHERE a.attrelid = runs AND a.attnum > 0 AND NOT a.attisdropped AND a.attname <> 'payload';
    FOR reader IN
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS role,
               bool_or(a.is_grantable) AS grantable
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = runs AND a.privilege_type = 'SELECT' AND a.grantee <> c.relowner
        GROUP BY a.grantee
    LOOP
        roles := roles || reader.role;
        options := options || reader.grantable;
    END LOOP;
    -- All revoked before any is granted: a CASCADE also takes the grants a
    -- holder of the grant option made, and those are converted too.
    FOR i IN 1 .. cardinality(roles) LOOP
        EXECUTE format('REVOKE SELECT ON %s FROM %s CASCADE', runs, roles[i]);
    END LOOP;
    FOR i IN 1 .. cardinality(roles) LOOP
        EXECUTE format('GRANT SELECT (%s) ON %s TO %s%s', columns, runs, roles[i],
                       CASE WHEN options[i] THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
    IF EXISTS (
        SELECT 1 FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = runs AND a.privilege_type = 'SELECT' AND a.grantee <> c.relowner
    ) THEN
        RAISE EXCEPTION 'syncworker: a table-level SELECT on % could not be converted', runs
            USING HINT = 'revoke it as its grantor, then migrate again';
    END IF;

    -- Earlier workers' ids (host:pid:random) in history, pseudonymised.
    UPDATE __SCHEMA__.runs r
    SET worker_id = 'w-' || left(md5(salt || r.worker_id), 12)
    WHERE r.worker_id LIKE '%:%' AND r.status NOT IN ('pending', 'running');
    UPDATE __SCHEMA__.workers w
    SET id = 'w-' || left(md5(salt || w.id), 12)
    WHERE w.id LIKE '%:%' AND w.state = 'stopped'
      AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.runs r
                      WHERE r.status IN ('pending', 'running')
                        AND w.id IN (r.worker_id, r.reserved_for));
END
$m$;
