-- thorn schema, version 26: an owner is a name of at most 255 characters.
--
-- The API refused an empty owner, but `thorn subscriber add --owner ''`
-- and a plain INSERT stored one: a row no token can manage (no token has
-- an empty `sub`), and whose events went to senders named ''. An owner too
-- long for the btree index `subscriber_owner` (about 2,700 bytes) failed
-- the write with the index's own error, which the API answered with a 500.
-- The rule now lives with the others, so that the API, the command line,
-- the config and a plain INSERT agree: NULL (an anonymous subscriber) or a
-- name of 1 to 255 characters.
--
-- Only an owner being set is judged, as for secrets (schema 17): rows
-- stored before keep working and can still be updated, switched off
-- included.

CREATE FUNCTION thorn.owner_problem(owner text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN owner = '' THEN
                    'must be a name, not empty (or null for a subscriber without an owner)'
                WHEN length(owner) > 255 THEN
                    'must be at most 255 characters' END
$$;

CREATE OR REPLACE FUNCTION thorn.subscriber_validate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad record;
BEGIN
    NEW.hmac_digest := lower(NEW.hmac_digest);
    NEW.content_type := lower(NEW.content_type);
    NEW.hmac_signer := lower(NEW.hmac_signer);
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
        NEW.created_at := OLD.created_at;
        IF NEW.active AND NOT OLD.active THEN
            NEW.deactivated_reason := NULL;
            NEW.failing_since := NULL;
        END IF;
    END IF;

    SELECT * INTO bad FROM thorn.subscriber_problems(
        NEW.event, NEW.url, NEW.hmac_digest, NEW.content_type,
        NEW.hmac_secret, NEW.hmac_signer) AS p
    WHERE NOT (TG_OP = 'UPDATE' AND p.column_name = 'hmac_secret'
               AND NEW.hmac_secret IS NOT DISTINCT FROM OLD.hmac_secret)
    LIMIT 1;
    IF NOT FOUND AND (TG_OP = 'INSERT' OR NEW.owner IS DISTINCT FROM OLD.owner) THEN
        SELECT 'owner' AS column_name, p AS problem INTO bad
        FROM thorn.owner_problem(NEW.owner) AS p WHERE p IS NOT NULL;
    END IF;
    IF FOUND THEN
        RAISE EXCEPTION 'thorn.subscriber.%: %', bad.column_name, bad.problem
            USING ERRCODE = 'check_violation', SCHEMA = 'thorn',
                  TABLE = 'subscriber', COLUMN = bad.column_name;
    END IF;
    RETURN NEW;
END
$$;
