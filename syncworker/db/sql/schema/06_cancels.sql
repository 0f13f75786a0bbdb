-- cancels: the runs an operator asked to stop (cancel(), 011).
--
-- A row means: this run must end `cancelled`, never be retried. The owning
-- worker, told on the wake channel, stops the run's step (ctx.stopping at
-- once, SIGTERM to a command, then after cancel_grace the step cancelled or
-- its process group killed) and writes the outcome `cancelled`; if the owner
-- is gone first, orphan recovery reads this row and ends the run
-- `cancelled` instead of retrying it. A pending run is cancelled by cancel()
-- itself. Written only by cancel(); the owner's alone like actions.

CREATE TABLE __SCHEMA__.cancels (
    run_id        bigint PRIMARY KEY,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    requested_by  text NOT NULL,
    reason        text
);
