-- jobs: the config's jobs, as `migrate` and `run` register them (001;
-- debounce from 012, misfire 'all' and misfire_limit from 013).
--
-- trigger() validates every request against this table, not against any
-- worker's config, so the SQL function, the CLI and every instance agree on
-- which jobs and scopes exist. last_fire_at is the per-fire exclusion across
-- instances: a cron fire is claimed by moving it forward (fires.sql), once.

CREATE TABLE __SCHEMA__.jobs (
    name          text PRIMARY KEY,
    enabled       boolean NOT NULL DEFAULT true,
    schedule      text[] NOT NULL DEFAULT '{}',
    timezone      text NOT NULL DEFAULT 'UTC',
    scopes        text[],                      -- NULL: the job has no scopes
    scopes_sql    text,
    on_overlap    text NOT NULL DEFAULT 'queue' CHECK (on_overlap IN ('queue', 'skip')),
    misfire       text NOT NULL DEFAULT 'run_once'
                  CHECK (misfire IN ('run_once', 'skip', 'all')),
    retries       integer NOT NULL DEFAULT 0 CHECK (retries >= 0),
    timeout       double precision NOT NULL DEFAULT 3600,
    -- The latest cron fire some worker has claimed: the per-fire exclusion
    -- across instances, and what a starting worker compares to find misfires.
    last_fire_at  timestamptz,
    next_fire_at  timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- Seconds every trigger of the job but a cron fire waits (012).
    debounce      double precision NOT NULL DEFAULT 0 CHECK (debounce >= 0),
    -- The most runs misfire = 'all' and `syncworker backfill` queue at once (013).
    misfire_limit integer NOT NULL DEFAULT 100 CHECK (misfire_limit >= 1)
);
