-- workers: one row per live or recently stopped worker (001; what it offers
-- trigger() from 005 and 007, its own lease lengths from 009).
--
-- lock_key is the second key of the session advisory lock the worker holds
-- while alive: PostgreSQL frees it when the session dies, which is how the
-- others see death. concurrency and first_steps are what it takes
-- reservations for (NULL first_steps: none, a worker of an older version);
-- reserve_by_id says it claims a reservation from the run's row, so the wake
-- may carry only the run's id. takeover_after and stale_after are the
-- silences after which peers may judge it gone, by its own heartbeat
-- interval (NULL: a worker of an earlier version, judged by the judge's).
-- The app role is granted nothing here: hostnames and pids stay private.

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
    state         text NOT NULL CHECK (state IN ('starting', 'idle', 'running', 'draining', 'stopped')),
    concurrency   integer NOT NULL DEFAULT 0,
    first_steps   jsonb,
    reserve_by_id boolean NOT NULL DEFAULT false,
    takeover_after double precision,
    stale_after   double precision
);
