-- The queue_drain example's tables. Run once: psql "$DATABASE_URL" -f setup.sql

-- Every message drained from Redis, once. A message is a JSON object with a
-- string "id"; anything else breaks a constraint and is sent back to Redis
-- with the rest of its batch.
CREATE TABLE IF NOT EXISTS queue_messages (
    id         bigserial PRIMARY KEY,
    queue      text NOT NULL,
    message_id text NOT NULL CHECK (message_id <> ''),
    body       jsonb NOT NULL CHECK (jsonb_typeof(body) = 'object'),
    run_id     bigint NOT NULL,
    drained_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (queue, message_id)
);

-- How far each JSONL file is committed. Written in the same transaction as
-- the rows: a file longer than this holds the tail of a batch that never
-- committed, and is cut back before the next append.
CREATE TABLE IF NOT EXISTS queue_files (
    path      text PRIMARY KEY,
    committed bigint NOT NULL DEFAULT 0
);
