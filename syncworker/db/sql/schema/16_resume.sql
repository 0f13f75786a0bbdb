-- resume(job, scope, by): lift a hold made by pause() (010).
--
-- The key's exact hold (the whole job's with scope NULL; a scope's hold is
-- lifted by naming the scope). Returns whether a hold in force was lifted;
-- an unknown job or scope is 22023 and changes nothing. Recorded in actions
-- and announced on the wake channel like pause(), and the job's name goes
-- out too: its waiting runs may start now.

CREATE FUNCTION __SCHEMA__.resume(
    job   text,
    scope text DEFAULT NULL,
    by    text DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    j      __SCHEMA__.jobs%ROWTYPE;
    actor  text := session_user::text;
    lifted boolean;
BEGIN
    SELECT * INTO j FROM __SCHEMA__.jobs WHERE name = resume.job;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'syncworker: unknown job %', quote_literal(coalesce(resume.job, 'NULL'))
            USING ERRCODE = '22023',
                  HINT = 'known jobs: ' || coalesce(
                      (SELECT string_agg(name, ', ' ORDER BY name) FROM __SCHEMA__.jobs), 'none');
    END IF;
    IF resume.scope IS NOT NULL AND (j.scopes IS NULL OR NOT resume.scope = ANY (j.scopes)) THEN
        RAISE EXCEPTION 'syncworker: unknown scope % for job %',
            quote_literal(resume.scope), quote_literal(j.name)
            USING ERRCODE = '22023',
                  HINT = coalesce('scopes: ' || array_to_string(j.scopes, ', '),
                                  'the job has no scopes');
    END IF;
    WITH gone AS (
        DELETE FROM __SCHEMA__.pauses p
        WHERE p.job = j.name AND coalesce(p.scope, '') = coalesce(resume.scope, '')
        RETURNING p.until
    )
    SELECT coalesce(bool_or(g.until IS NULL OR g.until > now()), false) INTO lifted FROM gone g;
    INSERT INTO __SCHEMA__.actions (actor, action, job, scope, detail)
    VALUES (actor, 'resume', j.name, resume.scope,
            json_build_object('lifted', lifted, 'by', resume.by)::jsonb);
    PERFORM pg_notify(__WAKE__, json_build_object('pause', j.name)::text);
    PERFORM pg_notify(__WAKE__, j.name);
    RETURN lifted;
END
$fn$;

REVOKE EXECUTE ON FUNCTION __SCHEMA__.resume(text, text, text) FROM PUBLIC;
