-- Creating and upgrading the schema, and registering the config's jobs
-- (db/schema.py). The migrations themselves are in ../migrations/.

-- name: migrate_lock :none
-- One migrator at a time across instances starting together.
SELECT pg_advisory_xact_lock(%(ns)s, 0);

-- name: schema_exists :one
-- Whether the schema exists.
-- Asked rather than CREATE SCHEMA IF NOT EXISTS: PostgreSQL checks CREATE on
-- the database even when the schema exists, and a least-privilege worker owns
-- a schema a DBA made for it without that right.
SELECT 1 AS found FROM pg_namespace WHERE nspname = %(schema)s;

-- name: create_schema :none
-- Create the schema, on a first migrate.
CREATE SCHEMA {s};

-- name: create_migrations_table :none
-- The ledger of applied migrations.
CREATE TABLE IF NOT EXISTS {s}.migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now());

-- name: applied_migrations :many
-- The versions applied already.
SELECT version FROM {s}.migrations;

-- name: record_migration :none
-- Note one migration as applied, in its own transaction.
INSERT INTO {s}.migrations (version) VALUES (%(version)s);

-- name: register_job :none
-- Insert or update one job of the config in jobs (trigger() reads it).
-- A changed schedule restarts the misfire baseline at now(), so the new
-- schedule is not judged against fires of the old one.
INSERT INTO {s}.jobs AS j (name, enabled, schedule, timezone, scopes, scopes_sql, on_overlap,
                           misfire, retries, timeout, debounce, misfire_limit, last_fire_at,
                           updated_at)
VALUES (%(name)s, %(enabled)s, %(schedule)s, %(timezone)s, %(scopes)s, %(scopes_sql)s,
        %(on_overlap)s, %(misfire)s, %(retries)s, %(timeout)s, %(debounce)s, %(misfire_limit)s,
        now(), now())
ON CONFLICT (name) DO UPDATE SET
    enabled = excluded.enabled,
    schedule = excluded.schedule,
    timezone = excluded.timezone,
    scopes = excluded.scopes,
    scopes_sql = excluded.scopes_sql,
    on_overlap = excluded.on_overlap,
    misfire = excluded.misfire,
    retries = excluded.retries,
    timeout = excluded.timeout,
    debounce = excluded.debounce,
    misfire_limit = excluded.misfire_limit,
    last_fire_at = CASE
        WHEN j.schedule IS DISTINCT FROM excluded.schedule
          OR j.timezone IS DISTINCT FROM excluded.timezone
          OR j.last_fire_at IS NULL
        THEN now() ELSE j.last_fire_at END,
    next_fire_at = CASE WHEN j.schedule IS DISTINCT FROM excluded.schedule
                        THEN NULL ELSE j.next_fire_at END,
    updated_at = now();

-- name: delete_unconfigured_jobs :none
-- Remove the jobs the config no longer has.
DELETE FROM {s}.jobs WHERE NOT (name = ANY(%(names)s));

-- name: set_scopes :none
-- Record a scopes_sql job's scopes as last read.
UPDATE {s}.jobs SET scopes = %(scopes)s, updated_at = now() WHERE name = %(job)s;
