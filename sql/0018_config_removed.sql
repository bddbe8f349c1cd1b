-- thorn schema, version 18: "removed from the config" is the config's to
-- set and to undo.
--
-- A config subscriber taken out of the config is switched off with
-- thorn.config_removed_reason(), and only that state lets it be deleted
-- outside the config (sql/0015). The guard allowed any change of `active`,
-- so the API or SQL could switch such a row on again, making it deliver
-- although no config names it, and then refuse to delete it; and switching
-- one off by hand with that reason made a row still in the config
-- deletable, to come back at the next sync with a new id and secret. Now,
-- outside the sync, a removed row can only be deleted (or put back in the
-- config), and no other row can be given that reason.

CREATE OR REPLACE FUNCTION thorn.subscriber_config_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    hint text;
BEGIN
    -- thorn.sync_config_subscribers sets the flag (its SET clause) and
    -- runs as its owner; anyone else setting it changes nothing.
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
        ELSIF NEW.active AND NOT OLD.active AND OLD.deactivated_reason = thorn.config_removed_reason() THEN
            hint := 'It was removed from the config: put it back there to switch it on, or delete it.';
        ELSIF NEW.deactivated_reason = thorn.config_removed_reason()
              AND OLD.deactivated_reason IS DISTINCT FROM thorn.config_removed_reason() THEN
            hint := 'Only removing it from the config marks it removed; switch it off with another reason.';
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
