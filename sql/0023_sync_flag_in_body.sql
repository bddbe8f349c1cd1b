-- thorn schema, version 23: one version of the config's sync function.
--
-- Schema 15's thorn.sync_config_subscribers set its flag with a SET
-- clause, until that migration was changed to set it in the function's
-- body: on PostgreSQL 15 a schema owner that is not a superuser may not
-- create a function that stores a custom parameter. Databases migrated
-- before the change keep the SET clause. They work, but a dump of them
-- cannot be restored by such an owner, and a later migration that edits
-- the function would meet two texts. Give them the body's version, the
-- same text that sql/0015 now makes.

DO $$
DECLARE
    fn CONSTANT regprocedure := 'thorn.sync_config_subscribers(jsonb)';
    def text := pg_get_functiondef(fn);
    set_clause CONSTANT text := E'\n SET "thorn.config_sync" TO ''on''';
    declared CONSTANT text := $old$
    removed CONSTANT text := thorn.config_removed_reason();
$old$;
    locked CONSTANT text := $old$
    PERFORM pg_advisory_xact_lock(hashtext('thorn.sync_config_subscribers'));
$old$;
    last CONSTANT text := $old$
    SELECT r.config_name, r.id, 'removed' FROM switched_off AS r;
END$old$;
BEGIN
    IF strpos(def, set_clause) = 0 THEN
        RETURN;  -- made by sql/0015 as it is now
    END IF;
    -- A superuser may have applied the old 0015 for an owner that could
    -- not: then only that superuser can replace it. The old form works, so
    -- say so and go on rather than stop the upgrade.
    IF NOT pg_has_role((SELECT p.proowner FROM pg_proc p WHERE p.oid = fn), 'USAGE') THEN
        RAISE WARNING 'thorn: % belongs to %, so it keeps its SET clause; run thorn migrate as that role to rewrite it (sql/0023)',
            fn, (SELECT pg_get_userbyid(p.proowner) FROM pg_proc p WHERE p.oid = fn);
        RETURN;
    END IF;
    IF (SELECT count(*) FROM unnest(ARRAY[declared, locked, last]) AS piece
        WHERE array_length(string_to_array(def, piece), 1) = 2) <> 3 THEN
        RAISE EXCEPTION 'thorn: sync_config_subscribers() is not the one schema 15 made';
    END IF;
    def := replace(def, set_clause, '');
    def := replace(def, declared, declared || $new$    flag_before CONSTANT text := current_setting('thorn.config_sync', true);
$new$);
    def := replace(def, locked, locked || $new$    -- The flag the triggers trust from this function's owner, put back
    -- before returning. (Not a SET clause: PostgreSQL 15 lets only a
    -- superuser store a custom parameter on a function, and a schema owner
    -- that is not one could not create it. Edited in place: a database
    -- that has this function was migrated by one, or on PostgreSQL 14.)
    PERFORM set_config('thorn.config_sync', 'on', true);
$new$);
    def := replace(def, last, $new$
    SELECT r.config_name, r.id, 'removed' FROM switched_off AS r;
    PERFORM set_config('thorn.config_sync', coalesce(flag_before, ''), true);
END$new$);
    EXECUTE def;
END
$$;
