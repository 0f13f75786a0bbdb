-- syncworker schema, version 1.
-- __SCHEMA__ is replaced by the quoted schema name, __WAKE__ by the quoted
-- literal of the internal wake-up channel.

CREATE TABLE __SCHEMA__.jobs (
    name          text PRIMARY KEY,
    enabled       boolean NOT NULL DEFAULT true,
    schedule      text[] NOT NULL DEFAULT '{}',
    timezone      text NOT NULL DEFAULT 'UTC',
    scopes        text[],                      -- NULL: the job has no scopes
    scopes_sql    text,
    on_overlap    text NOT NULL DEFAULT 'queue' CHECK (on_overlap IN ('queue', 'skip')),
    misfire       text NOT NULL DEFAULT 'run_once' CHECK (misfire IN ('run_once', 'skip')),
    retries       integer NOT NULL DEFAULT 0 CHECK (retries >= 0),
    timeout       double precision NOT NULL DEFAULT 3600,
    -- The latest cron fire some worker has claimed: the per-fire exclusion
    -- across instances, and what a starting worker compares to find misfires.
    last_fire_at  timestamptz,
    next_fire_at  timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE __SCHEMA__.runs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job               text NOT NULL,
    scope             text,
    status            text NOT NULL CHECK (status IN
                        ('pending', 'running', 'succeeded', 'failed', 'cancelled', 'skipped')),
    source            text NOT NULL,
    triggered_by      text,
    payload           jsonb NOT NULL DEFAULT '{}',
    scheduled_for     timestamptz,
    requested_at      timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    duration_ms       bigint,
    attempt           integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL DEFAULT 1,
    triggers          integer NOT NULL DEFAULT 1,  -- triggers coalesced into this run
    worker_id         text,
    current_step      text,
    records_total     bigint,
    records_processed bigint NOT NULL DEFAULT 0,
    records_inserted  bigint NOT NULL DEFAULT 0,
    records_updated   bigint NOT NULL DEFAULT 0,
    records_deleted   bigint NOT NULL DEFAULT 0,
    records_errored   bigint NOT NULL DEFAULT 0,
    error             text
);

-- The per-key guarantees, enforced by the database for every instance.
-- coalesce() makes an unscoped run (scope NULL) one key, on any PostgreSQL version.
CREATE UNIQUE INDEX runs_one_pending_per_key
    ON __SCHEMA__.runs (job, (coalesce(scope, ''))) WHERE status = 'pending';
CREATE UNIQUE INDEX runs_one_running_per_key
    ON __SCHEMA__.runs (job, (coalesce(scope, ''))) WHERE status = 'running';
CREATE UNIQUE INDEX runs_one_per_cron_fire
    ON __SCHEMA__.runs (job, (coalesce(scope, '')), scheduled_for) WHERE scheduled_for IS NOT NULL;
CREATE INDEX runs_active ON __SCHEMA__.runs (id) WHERE status IN ('pending', 'running');
CREATE INDEX runs_by_job ON __SCHEMA__.runs (job, scope, id DESC);

CREATE TABLE __SCHEMA__.run_steps (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id            bigint NOT NULL REFERENCES __SCHEMA__.runs (id) ON DELETE CASCADE,
    attempt           integer NOT NULL,
    position          integer NOT NULL,
    name              text NOT NULL,
    status            text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    duration_ms       bigint,
    records_total     bigint,
    records_processed bigint NOT NULL DEFAULT 0,
    records_inserted  bigint NOT NULL DEFAULT 0,
    records_updated   bigint NOT NULL DEFAULT 0,
    records_deleted   bigint NOT NULL DEFAULT 0,
    records_errored   bigint NOT NULL DEFAULT 0,
    error             text,
    UNIQUE (run_id, attempt, position)
);

CREATE TABLE __SCHEMA__.workers (
    id            text PRIMARY KEY,
    -- Second key of the session advisory lock the worker holds while alive:
    -- PostgreSQL frees it when the session dies, which is how others see death.
    lock_key      integer GENERATED ALWAYS AS IDENTITY UNIQUE,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    version       text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    stopped_at    timestamptz,
    state         text NOT NULL CHECK (state IN ('starting', 'idle', 'running', 'draining', 'stopped'))
);

-- The one way runs are requested: the CLI, the Python API, the worker's own
-- cron fires and NOTIFY triggers all come through here, so coalescing and
-- validation live in one place. SECURITY DEFINER lets an app role that may
-- only EXECUTE this function request runs without write access to the tables.
CREATE FUNCTION __SCHEMA__.trigger(
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
    END LOOP;

    -- Delivered at commit: workers wake only once the runs are visible.
    PERFORM pg_notify(__WAKE__, j.name);
END
$fn$;
