-- The example's tables. Run once before the worker starts: its scopes_sql
-- reads `orgs`.   psql "$DATABASE_URL" -f examples/mirror/setup.sql

-- The organisations to sync: the job's scopes are the active ones.
CREATE TABLE IF NOT EXISTS orgs (
    code text PRIMARY KEY,
    name text NOT NULL,
    active boolean NOT NULL DEFAULT true
);
INSERT INTO orgs (code, name, active) VALUES
    ('RIO', 'Rio de Janeiro', true),
    ('HOU', 'Houston', true),
    ('OSL', 'Oslo', false)
ON CONFLICT (code) DO NOTHING;

-- Each organisation's users live in a table of their own, org_users."<code>",
-- which the sync step creates from this template on first use (LIKE ...
-- INCLUDING ALL copies the primary key that the mirror's key needs).
CREATE SCHEMA IF NOT EXISTS org_users;
CREATE TABLE IF NOT EXISTS org_users.template (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    email text,
    role text,
    updated_at timestamptz
);

-- One change log for all of them: the columns syncworker.mirror writes
-- (the output of syncworker.mirror.changes_table_ddl('org_users.changes')).
CREATE TABLE IF NOT EXISTS org_users.changes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id bigint,
    table_name text NOT NULL,
    scope text,
    kind text NOT NULL CHECK (kind IN ('insert', 'update', 'delete')),
    key jsonb NOT NULL,
    old jsonb,
    new jsonb,
    changed_at timestamptz NOT NULL DEFAULT now()
);
