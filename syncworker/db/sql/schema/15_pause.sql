-- pause(job, scope, until, reason, by): hold a job, or one scope of it (010);
-- returns the hold as written.
--
-- Validated as trigger() validates (an unknown job or scope is 22023 and
-- changes nothing); an `until` that is not in the future is refused too.
-- Pausing a held key again replaces its until and reason. Recorded in
-- actions, and announced on the wake channel at commit (`{"pause": job}`,
-- events.py) so that every worker re-reads when the next hold ends.
-- SECURITY DEFINER, EXECUTE revoked from PUBLIC: granted per role (README
-- "Operating").

CREATE FUNCTION __SCHEMA__.pause(
    job    text,
    scope  text DEFAULT NULL,
    until  timestamptz DEFAULT NULL,
    reason text DEFAULT NULL,
    by     text DEFAULT NULL
) RETURNS __SCHEMA__.pauses
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    j     __SCHEMA__.jobs%ROWTYPE;
    held  __SCHEMA__.pauses%ROWTYPE;
    actor text := session_user::text;  -- the record names the role, whatever `by` says
    asker text := coalesce(pause.by, session_user::text);
BEGIN
    SELECT * INTO j FROM __SCHEMA__.jobs WHERE name = pause.job;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'syncworker: unknown job %', quote_literal(coalesce(pause.job, 'NULL'))
            USING ERRCODE = '22023',
                  HINT = 'known jobs: ' || coalesce(
                      (SELECT string_agg(name, ', ' ORDER BY name) FROM __SCHEMA__.jobs), 'none');
    END IF;
    IF pause.scope IS NOT NULL AND (j.scopes IS NULL OR NOT pause.scope = ANY (j.scopes)) THEN
        RAISE EXCEPTION 'syncworker: unknown scope % for job %',
            quote_literal(pause.scope), quote_literal(j.name)
            USING ERRCODE = '22023',
                  HINT = coalesce('scopes: ' || array_to_string(j.scopes, ', '),
                                  'the job has no scopes');
    END IF;
    IF pause.until IS NOT NULL
       AND (NOT isfinite(pause.until) OR pause.until >= '10000-01-01 00:00+00') THEN
        RAISE EXCEPTION 'syncworker: until % is too far: give a time before the year 10000',
            pause.until USING ERRCODE = '22023';
    END IF;
    IF pause.until IS NOT NULL AND pause.until <= now() THEN
        RAISE EXCEPTION 'syncworker: until % is not in the future', pause.until
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO __SCHEMA__.pauses AS p (job, scope, paused_by, reason, until)
    VALUES (j.name, pause.scope, asker, pause.reason, pause.until)
    ON CONFLICT (job, (coalesce(scope, '')))
    DO UPDATE SET paused_at = now(), paused_by = excluded.paused_by,
                  reason = excluded.reason, until = excluded.until
    RETURNING * INTO held;
    INSERT INTO __SCHEMA__.actions (actor, action, job, scope, detail)
    VALUES (actor, 'pause', j.name, pause.scope,
            json_build_object('until', pause.until, 'reason', pause.reason,
                              'by', pause.by)::jsonb);
    PERFORM pg_notify(__WAKE__, json_build_object('pause', j.name)::text);
    RETURN held;
END
$fn$;

REVOKE EXECUTE ON FUNCTION __SCHEMA__.pause(text, text, timestamptz, text, text) FROM PUBLIC;
