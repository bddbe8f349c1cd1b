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
-- a row with a config_name or changing what the config sets (everything
-- but `active`) is refused, so that an edit through the API or SQL is not
-- silently undone at the next restart. Switching one off (by hand, 410
-- Gone, auto-disable) is allowed and survives restarts; a sync that
-- changes its URL switches it on again.
--
-- An entry removed from the config is switched off, not deleted: its row
-- keeps its id, secret and deliveries (a daemon started with an older
-- config must not destroy them), with the reason below. The entry coming
-- back switches it on again; until then it may be deleted like any row.

ALTER TABLE thorn.subscriber ADD COLUMN config_name text;
ALTER TABLE thorn.subscriber ADD CONSTRAINT subscriber_config_name_key UNIQUE (config_name);

CREATE FUNCTION thorn.config_removed_reason() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 'removed from thorn''s config'::text $$;

CREATE FUNCTION thorn.subscriber_config_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    hint text;
BEGIN
    -- thorn.sync_config_subscribers sets the flag and runs as its owner;
    -- anyone else setting it changes nothing.
    IF current_setting('thorn.config_sync', true) = 'on'
       AND current_user = (SELECT pg_get_userbyid(p.proowner) FROM pg_proc p
                           WHERE p.oid = 'thorn.sync_config_subscribers(jsonb)'::regprocedure) THEN
        RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_OP <> 'INSERT' AND OLD.config_name IS NOT NULL THEN
        IF TG_OP = 'DELETE' THEN
            IF NOT OLD.active AND OLD.deactivated_reason = thorn.config_removed_reason() THEN
                RETURN OLD;
            END IF;
            hint := 'Remove it from the config first (SIGHUP or restart): that switches it off, and then it may be deleted.';
        ELSIF (NEW.config_name, NEW.event, NEW.url, NEW.owner, NEW.hmac_secret, NEW.hmac_digest,
               NEW.content_type, NEW.hmac_signer, NEW.ordered)
              IS DISTINCT FROM (OLD.config_name, OLD.event, OLD.url, OLD.owner, OLD.hmac_secret,
                                OLD.hmac_digest, OLD.content_type, OLD.hmac_signer, OLD.ordered) THEN
            hint := 'Only active may be changed outside the config.';
        ELSE
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'thorn.subscriber.config_name: subscriber % comes from thorn''s config ([subscribers.%]); change or remove it there',
                OLD.id, OLD.config_name
            USING ERRCODE = 'object_not_in_prerequisite_state', SCHEMA = 'thorn',
                  TABLE = 'subscriber', COLUMN = 'config_name', HINT = hint;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.config_name IS NOT NULL THEN
        RAISE EXCEPTION 'thorn.subscriber.config_name: only thorn''s config makes subscribers with a config_name ([subscribers.%])',
                NEW.config_name
            USING ERRCODE = 'object_not_in_prerequisite_state', SCHEMA = 'thorn',
                  TABLE = 'subscriber', COLUMN = 'config_name';
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
-- names not in `entries` are switched off with thorn.config_removed_reason()
-- (see above). Returns each row created, changed, restored (back in the
-- config) or removed.
--
-- SECURITY DEFINER so that a least-privilege daemon role (sql/roles.sql)
-- can manage these rows and no others. Concurrent syncs (several daemons
-- starting) take turns on a transaction lock, and the last one's config
-- wins: callers run it under READ COMMITTED, so each statement sees what
-- the sync before it committed.
CREATE FUNCTION thorn.sync_config_subscribers(entries jsonb)
RETURNS TABLE (entry text, subscriber_id uuid, change text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    removed CONSTANT text := thorn.config_removed_reason();
    flag_before CONSTANT text := current_setting('thorn.config_sync', true);
BEGIN
    IF jsonb_typeof(entries) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'thorn.sync_config_subscribers: entries must be a JSON object of name → subscriber';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('thorn.sync_config_subscribers'));
    -- The flag the triggers trust from this function's owner, put back
    -- before returning. (Not a SET clause: PostgreSQL 15 lets only a
    -- superuser store a custom parameter on a function, and a schema owner
    -- that is not one could not create it. Edited in place: a database
    -- that has this function was migrated by one, or on PostgreSQL 14.)
    PERFORM set_config('thorn.config_sync', 'on', true);

    RETURN QUERY
    WITH changed AS (
        UPDATE thorn.subscriber AS s
        SET event = w.event, url = w.url, owner = w.owner,
            hmac_secret = coalesce(w.hmac_secret, s.hmac_secret),
            hmac_digest = w.hmac_digest, content_type = w.content_type,
            hmac_signer = w.hmac_signer, ordered = w.ordered,
            -- Back in the config, or a new address (a fix for the one that
            -- failed): switched on.
            active = s.active OR o.was_removed OR s.url IS DISTINCT FROM w.url
        FROM thorn.config_entries(entries) AS w,
             -- The row as it was, for RETURNING (which sees the new one).
             (SELECT b.id, NOT b.active AND b.deactivated_reason IS NOT DISTINCT FROM removed
                     AS was_removed
              FROM thorn.subscriber AS b WHERE b.config_name IS NOT NULL) AS o
        WHERE s.config_name = w.name AND o.id = s.id
          AND (o.was_removed
               OR (s.event, s.url, s.owner, s.hmac_secret, s.hmac_digest, s.content_type,
                   s.hmac_signer, s.ordered)
                  IS DISTINCT FROM (w.event, w.url, w.owner, coalesce(w.hmac_secret, s.hmac_secret),
                                    w.hmac_digest, w.content_type, w.hmac_signer, w.ordered))
        RETURNING s.config_name, s.id, o.was_removed
    )
    SELECT c.config_name, c.id, CASE WHEN c.was_removed THEN 'restored' ELSE 'changed' END
    FROM changed AS c;

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
    WITH switched_off AS (
        UPDATE thorn.subscriber AS s SET active = false, deactivated_reason = removed
        WHERE s.config_name IS NOT NULL
          AND (s.active OR s.deactivated_reason IS DISTINCT FROM removed)
          AND NOT EXISTS (SELECT FROM thorn.config_entries(entries) AS w WHERE w.name = s.config_name)
        RETURNING s.config_name, s.id
    )
    SELECT r.config_name, r.id, 'removed' FROM switched_off AS r;
    PERFORM set_config('thorn.config_sync', coalesce(flag_before, ''), true);
END
$$;
REVOKE ALL ON FUNCTION thorn.sync_config_subscribers(jsonb) FROM PUBLIC;
