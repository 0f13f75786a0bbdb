-- Statements about the session itself, not the schema's tables.

-- name: listen :none
-- LISTEN on a channel ({channel}: its identifier, composed where the channel is known).
LISTEN {channel};

-- name: ping :none
-- Prove the session answers (the listener's libpq ping, the poll mode's check).
SELECT 1;

-- name: probe_notify :none
-- Notify the probe channel from a second session (listenprobe.py).
SELECT pg_notify(%(channel)s, 'probe');

-- name: clock :one
-- The database's clock, for the worker's offset (dbclock.py).
SELECT clock_timestamp() AS now;

-- name: server_version :one
-- The server's version, for `syncworker check`.
SELECT current_setting('server_version') AS version;

-- name: reset_session :none
-- Give a step connection back as new: settings, SET ROLE, temp tables, prepared statements, LISTENs, locks.
-- psycopg forgets its own prepared statements when it sees DISCARD ALL's command tag.
DISCARD ALL;
