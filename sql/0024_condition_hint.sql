-- thorn schema, version 24: a condition that is not boolean is told so.
--
-- webhook_event(…, condition => 'NEW.id') was refused at once, as it
-- should be, but with the planner's words ("COALESCE types integer and
-- boolean cannot be matched"), which do not say what is wrong. The hint
-- of every refused condition now says that a condition is a boolean
-- expression. Swap the hint's text in _install rather than restate it.

DO $$
DECLARE
    old_hint CONSTANT text := $old$HINT = 'conditions are SQL over new and old (a create has only new, '$old$;
    new_hint CONSTANT text := $new$HINT = 'a condition is a boolean SQL expression over new and old (a create has only new, '$new$;
    def text := pg_get_functiondef('thorn._install(regclass)'::regprocedure);
BEGIN
    IF strpos(def, old_hint) = 0 THEN
        RAISE EXCEPTION 'thorn: _install(regclass) does not give the hint schema 6 gave';
    END IF;
    EXECUTE replace(def, old_hint, new_hint);
END
$$;
