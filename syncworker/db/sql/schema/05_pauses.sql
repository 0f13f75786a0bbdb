-- pauses and actions: keys held by an operator, and what operators did (010;
-- cancel and run_id from 011, backfill from 013).
--
-- A row of pauses in force (until NULL or later than now()) holds its job
-- (scope NULL) or one scope of it: no run of the key starts on any worker,
-- because every claim (claimable(), trigger_and_claim(), a reservation's
-- claim) tests it in the statement that takes the run, and trigger()
-- reserves no run for it. Triggers are still stored and coalesced and wait
-- as pending; a cron fire of a held key is claimed but not run, and not
-- caught up later. An `until` that passes lifts the hold by itself: the row
-- stays (status no longer shows it) until the key is paused again or resumed.
-- Written only by pause() and resume(); both record themselves in actions
-- (who: session_user, or the `by` they were given; when; why).
-- Only the functions write them. A hold is as visible as its job: whoever
-- may read jobs may read pauses (010 grants it to them; `status` shows
-- both). actions, the record, is granted to nobody by default.

CREATE TABLE __SCHEMA__.pauses (
    job        text NOT NULL,
    scope      text,  -- NULL: the whole job
    paused_at  timestamptz NOT NULL DEFAULT now(),
    paused_by  text NOT NULL,
    reason     text,
    until      timestamptz  -- NULL: until resume()
);
CREATE UNIQUE INDEX pauses_one_per_key ON __SCHEMA__.pauses (job, (coalesce(scope, '')));

CREATE TABLE __SCHEMA__.actions (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL CHECK (action IN ('pause', 'resume', 'cancel', 'backfill')),
    job     text NOT NULL,
    scope   text,
    detail  jsonb NOT NULL DEFAULT '{}',
    run_id  bigint  -- the run a cancel was for
);
