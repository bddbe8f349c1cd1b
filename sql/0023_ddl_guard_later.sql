-- thorn schema, version 23: the DDL guard can be completed later.
--
-- The guard's event triggers (sql/0004, 0009, 0013) need a superuser, and
-- those migrations create them only when `thorn migrate` runs as one. A
-- database migrated first by another role never got them, even when a
-- superuser migrated it later: the migrations had already run, and there
-- was no other way to add them.
--
-- thorn.install_ddl_guard() creates whichever of them is missing, as the
-- migrations would have. This migration calls it when run by a superuser,
-- and so does every `thorn migrate` run by one (src/db/migrate.rs), so a
-- superuser's migrate completes the guard whatever the database's history.
-- Annotations are not checked again then: DDL made without the guard may
-- have left one naming a dropped or renamed column until it is annotated
-- again (docs/security.md).

CREATE FUNCTION thorn.install_ddl_guard() RETURNS text[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    made text[] := '{}';
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'thorn: only a superuser can create the DDL guard''s event triggers'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'thorn_ddl_guard') THEN
        CREATE EVENT TRIGGER thorn_ddl_guard ON ddl_command_end
            EXECUTE FUNCTION thorn._ddl_guard();
        made := made || 'thorn_ddl_guard'::text;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'thorn_ddl_forget') THEN
        CREATE EVENT TRIGGER thorn_ddl_forget ON sql_drop
            WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
            EXECUTE FUNCTION thorn._ddl_forget();
        made := made || 'thorn_ddl_forget'::text;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'thorn_ddl_partitions') THEN
        CREATE EVENT TRIGGER thorn_ddl_partitions ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
            EXECUTE FUNCTION thorn._ddl_partitions();
        made := made || 'thorn_ddl_partitions'::text;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'thorn_ddl_columns') THEN
        CREATE EVENT TRIGGER thorn_ddl_columns ON sql_drop
            EXECUTE FUNCTION thorn._ddl_columns();
        made := made || 'thorn_ddl_columns'::text;
    END IF;
    RETURN made;
END
$$;

REVOKE ALL ON FUNCTION thorn.install_ddl_guard() FROM PUBLIC;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        PERFORM thorn.install_ddl_guard();
    END IF;
END
$$;
