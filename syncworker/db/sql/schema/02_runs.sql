-- runs and run_steps: one row per run of a key (job, scope), one per step of
-- each attempt (001; reserved_for and two indexes from 005, not_before from
-- 012, backfill runs out of runs_one_pending_per_key from 013).
--
-- The per-key guarantees live in the partial unique indexes: at most one
-- pending and one running run per key (backfill runs apart: one per fire),
-- one run per cron fire, for every instance alike. coalesce() makes an unscoped run (scope NULL) one key on
-- any PostgreSQL version. reserved_for names the worker trigger() reserved a
-- new run for (005): only that worker may claim it until it is released.
-- The app role may read every column but payload (007, README
-- "Least-privilege roles"); a column added here is readable by no one but
-- the owner until its migration grants it.
-- Triggers on runs are in the files of the functions they call.

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
    error             text,
    reserved_for      text,
    not_before        timestamptz  -- the earliest start (012): a delayed trigger
);

-- Backfill runs (source 'backfill', 013) are left out: one waits per fire.
CREATE UNIQUE INDEX runs_one_pending_per_key
    ON __SCHEMA__.runs (job, (coalesce(scope, '')))
    WHERE status = 'pending' AND source <> 'backfill';
CREATE UNIQUE INDEX runs_one_running_per_key
    ON __SCHEMA__.runs (job, (coalesce(scope, ''))) WHERE status = 'running';
CREATE UNIQUE INDEX runs_one_per_cron_fire
    ON __SCHEMA__.runs (job, (coalesce(scope, '')), scheduled_for) WHERE scheduled_for IS NOT NULL;
-- The claim's walk in id order (claimable()).
CREATE INDEX runs_active ON __SCHEMA__.runs (id) WHERE status IN ('pending', 'running');
-- A key's newest runs: status, metrics' last success, pruning's newer-run test.
CREATE INDEX runs_by_job ON __SCHEMA__.runs (job, scope, id DESC);
CREATE INDEX runs_reserved ON __SCHEMA__.runs (reserved_for) WHERE reserved_for IS NOT NULL;
CREATE INDEX runs_running_by_worker ON __SCHEMA__.runs (worker_id) WHERE status = 'running';
-- A key's backfill runs by fire: claimable()'s earlier-fire test (013).
CREATE INDEX runs_backfill_pending ON __SCHEMA__.runs (job, (coalesce(scope, '')), scheduled_for)
    WHERE status = 'pending' AND source = 'backfill';
-- The soonest delayed run's start (next_release in db/sql/queries/pauses.sql).
CREATE INDEX runs_delayed ON __SCHEMA__.runs (not_before)
    WHERE status = 'pending' AND not_before IS NOT NULL;

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
