-- refuse_large_payload() and its trigger: a run's payload is at most 1 MiB of JSON (008).
--
-- A payload travels with its run (every claim's answer, a command step's
-- file, ctx.payload in memory); past a size it is a mistake that would make
-- every run of the key slow or failing, so it is refused where it comes in,
-- on every path, with a message naming the limit. Only payloads that are not
-- small, or arrive compressed (a value read from a table), are measured.

CREATE FUNCTION __SCHEMA__.refuse_large_payload() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    size integer := octet_length(NEW.payload::text);
BEGIN
    IF size > 1048576 THEN
        RAISE EXCEPTION 'syncworker: payload is % bytes of JSON, over the limit of 1048576 (1 MiB)', size
            USING ERRCODE = '22023',
                  HINT = 'keep large data in a table of your own and pass its key in the payload';
    END IF;
    RETURN NEW;
END
$fn$;

REVOKE EXECUTE ON FUNCTION __SCHEMA__.refuse_large_payload() FROM PUBLIC;

CREATE TRIGGER runs_payload_size_limit
    BEFORE INSERT OR UPDATE OF payload ON __SCHEMA__.runs
    FOR EACH ROW WHEN (pg_column_size(NEW.payload) > 65536
                       OR pg_column_compression(NEW.payload) IS NOT NULL)
    EXECUTE FUNCTION __SCHEMA__.refuse_large_payload();
