-- thorn schema, version 19: an operator's switch-off holds.
--
-- Owners may switch their subscriptions off and on again (the API's
-- PATCH {"active": …}). An operator who switches one off (`thorn
-- subscriber disable`, or an admin through the API) means it to stay off,
-- e.g. an endpoint that turned out to target a third party; until now its
-- owner could switch it straight back on. `operator_off` marks such a
-- switch-off: while it is set the row stays inactive, and only clearing it
-- (`thorn subscriber enable`, an admin's PATCH {"active": true}) switches
-- the row on.
--
-- A config sync that would switch such a row on (its entry back in the
-- config, or a new URL) leaves it off instead of failing the whole sync:
-- the operator's word wins over the config's. An entry back in the config
-- is no longer "removed from thorn's config" (sql/0018), which would let
-- it be deleted while configured and refuse the operator's switch-on: it
-- is then simply an operator's switch-off.

ALTER TABLE thorn.subscriber ADD COLUMN operator_off boolean NOT NULL DEFAULT false;

CREATE FUNCTION thorn.subscriber_operator_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    reason text := NEW.deactivated_reason;
BEGIN
    IF NOT (NEW.operator_off AND NEW.active) THEN
        RETURN NEW;
    END IF;
    -- Only the sync sets this flag; anyone else who sets it gets their
    -- switch-on ignored, which grants nothing.
    IF TG_OP = 'UPDATE' AND NOT OLD.active
       AND current_setting('thorn.config_sync', true) = 'on' THEN
        NEW.active := false;
        NEW.deactivated_reason := CASE
            WHEN OLD.deactivated_reason = thorn.config_removed_reason()
            THEN 'switched off by an operator'
            ELSE OLD.deactivated_reason END;
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        reason := OLD.deactivated_reason;
    END IF;
    RAISE EXCEPTION 'thorn.subscriber.operator_off: subscriber % was switched off by an operator (%); only an operator switches it on again',
            NEW.id, coalesce(reason, 'no reason given')
        USING ERRCODE = 'object_not_in_prerequisite_state', SCHEMA = 'thorn',
              TABLE = 'subscriber', COLUMN = 'operator_off',
              HINT = 'thorn subscriber enable, or an admin''s PATCH {"active": true}, clears operator_off.';
END
$$;

-- After subscriber_validate (BEFORE triggers run in name order), which
-- clears the reason of a row being switched on.
CREATE TRIGGER subscriber_validate_operator
    BEFORE INSERT OR UPDATE ON thorn.subscriber
    FOR EACH ROW EXECUTE FUNCTION thorn.subscriber_operator_guard();
