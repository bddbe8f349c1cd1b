-- thorn schema, version 14: a subscriber switched on again starts healthy.
--
-- A subscriber switched off for failing (delivery.disable_after) kept its
-- failing_since when switched on again (SQL, `thorn subscriber enable`, a
-- PATCH of `active`). The next failure left it set (it is only set when
-- NULL) and the health check saw a subscriber failing for days: switched
-- off again at its first failure, so "switch it on, then `thorn retry`"
-- did not work. Switching on now clears it with the reason. Swap in one
-- line rather than restate the trigger function.
DO $$
DECLARE
    old_line CONSTANT text := 'NEW.deactivated_reason := NULL;';
    def text := pg_get_functiondef('thorn.subscriber_validate()'::regprocedure);
BEGIN
    IF strpos(def, old_line) = 0 THEN
        RAISE EXCEPTION 'thorn: subscriber_validate() is not the one schema 3 installed';
    END IF;
    EXECUTE replace(def, old_line, old_line || E'\n            NEW.failing_since := NULL;');
END
$$;
