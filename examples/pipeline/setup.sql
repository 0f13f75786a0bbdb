-- The employee pipeline's tables. Run once: psql "$DATABASE_URL" -f setup.sql

-- The outside world: in real life an HR system's API. Here a table you can
-- edit by hand to see the pipeline notice hires, leavers and changes.
CREATE TABLE IF NOT EXISTS hr_employees (
    employee_id text PRIMARY KEY,
    name        text NOT NULL,
    department  text NOT NULL,
    title       text NOT NULL
);
INSERT INTO hr_employees VALUES
    ('E001', 'Ada Lovelace',    'Engineering', 'Engineer'),
    ('E002', 'Grace Hopper',    'Engineering', 'Lead Engineer'),
    ('E003', 'Katherine Johnson', 'Research',  'Analyst')
ON CONFLICT DO NOTHING;

-- Step 1 writes the latest snapshot here, replacing the previous one.
CREATE TABLE IF NOT EXISTS employee_staging (
    employee_id text PRIMARY KEY,
    name        text NOT NULL,
    department  text NOT NULL,
    title       text NOT NULL,
    run_id      bigint NOT NULL,
    taken_at    timestamptz NOT NULL
);

-- Step 2 keeps every version of every employee: the open one has valid_to NULL.
-- opened_by / closed_by name the run that made the change, so step 3 (and a
-- retried run) can find exactly what one run did.
CREATE TABLE IF NOT EXISTS employee_history (
    id          bigserial PRIMARY KEY,
    employee_id text NOT NULL,
    name        text NOT NULL,
    department  text NOT NULL,
    title       text NOT NULL,
    valid_from  timestamptz NOT NULL,
    valid_to    timestamptz,
    opened_by   bigint NOT NULL,
    closed_by   bigint
);
CREATE UNIQUE INDEX IF NOT EXISTS employee_history_one_open
    ON employee_history (employee_id) WHERE valid_to IS NULL;

-- Step 3 records what changed, one row per employee and run.
CREATE TABLE IF NOT EXISTS employee_changes (
    run_id      bigint NOT NULL,
    employee_id text NOT NULL,
    change      text NOT NULL CHECK (change IN ('hired', 'left', 'changed')),
    fields      jsonb NOT NULL DEFAULT '{}',  -- changed: {"title": ["old", "new"]}
    detected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, employee_id)
);
