-- thorn schema, version 15: subscribers kept in the daemon's config
-- (`[subscribers.<name>]` tables, Thorn's THORN_SUBSCRIBERS).
--
-- `thorn run` writes them into thorn.subscriber at start and on reload,
-- through thorn.sync_config_subscribers, so that matching, signing,
-- retries and the REST API's listing treat them like any other subscriber.
-- Their rows carry the config's name for them in `config_name`; rows made
-- any other way have NULL there.
--
-- The config is the one place to change them: outside the sync, inserting
-- a row with a config_name, deleting one, or changing what the config sets
-- (everything but `active`) is refused, so that an edit through the API or
-- SQL is not silently undone at the next restart. Switching one off (by
-- hand, 410 Gone, auto-disable) is allowed and survives restarts; a sync
-- that changes its URL switches it on again.

ALTER TABLE thorn.subscriber ADD COLUMN config_name text;
ALTER TABLE thorn.subscriber ADD CONSTRAINT subscriber_config_name_key UNIQUE (config_name);

CREATE FUNCTION thorn.subscriber_config_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    name text := CASE TG_OP WHEN 'INSERT' THEN NEW.config_name ELSE OLD.config_name END;
    touched boolean;
BEGIN
    -- Set only while thorn.sync_config_subscribers runs (its SET clause).
    IF current_setting('thorn.config_sync', true) = 'on' THEN
        RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    touched := CASE TG_OP
        WHEN 'UPDATE' THEN (NEW.config_name, NEW.event, NEW.url, NEW.owner, NEW.hmac_secret,
                            NEW.hmac_digest, NEW.content_type, NEW.hmac_signer, NEW.ordered)
            IS DISTINCT FROM (OLD.config_name, OLD.event, OLD.url, OLD.owner, OLD.hmac_secret,
                              OLD.hmac_digest, OLD.content_type, OLD.hmac_signer, OLD.ordered)
        ELSE true END;
    name := coalesce(name, NEW.config_name);
    IF name IS NOT NULL AND touched THEN
        RAISE EXCEPTION 'thorn.subscriber.config_name: subscriber % comes from thorn''s config ([subscribers.%]); change or remove it there',
                coalesce(OLD.id, NEW.id), name
            USING ERRCODE = 'object_not_in_prerequisite_state', SCHEMA = 'thorn',
                  TABLE = 'subscriber', COLUMN = 'config_name',
                  HINT = 'Only active may be changed outside the config.';
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END
$$;

-- Named to fire after subscriber_validate (BEFORE triggers run in name
-- order), so it compares normalised values: a PATCH that repeats a digest
-- in capitals changes nothing.
CREATE TRIGGER subscriber_validate_config
    BEFORE INSERT OR UPDATE OR DELETE ON thorn.subscriber
    FOR EACH ROW EXECUTE FUNCTION thorn.subscriber_config_guard();

-- The entries of a sync as rows, with the defaults and normalisation of
-- subscriber_validate applied (so that comparing them with a row is fair).
CREATE FUNCTION thorn.config_entries(entries jsonb)
RETURNS TABLE (name text, event text, url text, owner text, hmac_secret text,
               hmac_digest text, content_type text, hmac_signer text, ordered boolean)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e.key, w.event, w.url, w.owner, w.hmac_secret,
           lower(coalesce(w.hmac_digest, 'sha256')),
           lower(coalesce(w.content_type, 'application/json')),
           lower(coalesce(w.hmac_signer, 'sign')), coalesce(w.ordered, false)
    FROM jsonb_each(entries) AS e,
         LATERAL jsonb_to_record(e.value) AS w(event text, url text, owner text, hmac_secret text,
             hmac_digest text, content_type text, hmac_signer text, ordered boolean)
$$;

-- Makes the config-made rows what `entries` says: a JSON object of
-- name → {event, url, owner, hmac_secret, hmac_digest, content_type,
-- hmac_signer, ordered}; absent values take the column defaults, and an
-- absent secret keeps the one the row has (or gets a random one). Rows of
-- names not in `entries` are deleted, with their deliveries. Returns each
-- row created, changed or removed.
--
-- SECURITY DEFINER so that a least-privilege daemon role (sql/roles.sql)
-- can manage these rows and no others. Concurrent syncs (several daemons
-- starting) take turns on a transaction lock; the last one's config wins.
CREATE FUNCTION thorn.sync_config_subscribers(entries jsonb)
RETURNS TABLE (entry text, subscriber_id uuid, change text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET thorn.config_sync = 'on'
AS $$
BEGIN
    IF jsonb_typeof(entries) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'thorn.sync_config_subscribers: entries must be a JSON object of name → subscriber';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('thorn.sync_config_subscribers'));

    RETURN QUERY
    WITH changed AS (
        UPDATE thorn.subscriber AS s
        SET event = w.event, url = w.url, owner = w.owner,
            hmac_secret = coalesce(w.hmac_secret, s.hmac_secret),
            hmac_digest = w.hmac_digest, content_type = w.content_type,
            hmac_signer = w.hmac_signer, ordered = w.ordered,
            -- A new address is a fix for the one that failed.
            active = s.active OR s.url IS DISTINCT FROM w.url
        FROM thorn.config_entries(entries) AS w
        WHERE s.config_name = w.name
          AND (s.event, s.url, s.owner, s.hmac_secret, s.hmac_digest, s.content_type,
               s.hmac_signer, s.ordered)
              IS DISTINCT FROM (w.event, w.url, w.owner, coalesce(w.hmac_secret, s.hmac_secret),
               w.hmac_digest, w.content_type, w.hmac_signer, w.ordered)
        RETURNING s.config_name, s.id
    )
    SELECT c.config_name, c.id, 'changed' FROM changed AS c;

    RETURN QUERY
    WITH created AS (
        INSERT INTO thorn.subscriber AS s (config_name, event, url, owner, hmac_secret,
                                           hmac_digest, content_type, hmac_signer, ordered)
        SELECT w.name, w.event, w.url, w.owner, coalesce(w.hmac_secret, thorn.random_secret()),
               w.hmac_digest, w.content_type, w.hmac_signer, w.ordered
        FROM thorn.config_entries(entries) AS w
        WHERE NOT EXISTS (SELECT FROM thorn.subscriber AS s WHERE s.config_name = w.name)
        RETURNING s.config_name, s.id
    )
    SELECT c.config_name, c.id, 'created' FROM created AS c;

    RETURN QUERY
    WITH removed AS (
        DELETE FROM thorn.subscriber AS s
        WHERE s.config_name IS NOT NULL
          AND NOT EXISTS (SELECT FROM thorn.config_entries(entries) AS w WHERE w.name = s.config_name)
        RETURNING s.config_name, s.id
    )
    SELECT r.config_name, r.id, 'removed' FROM removed AS r;
END
$$;
REVOKE ALL ON FUNCTION thorn.sync_config_subscribers(jsonb) FROM PUBLIC;
