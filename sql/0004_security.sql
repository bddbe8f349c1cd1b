-- thorn schema, version 4: keeping annotations valid when tables change.
--
-- webhook_model checks every column an annotation names when it is called,
-- but a later ALTER TABLE could rename or drop one of them. Left alone, that
-- would break the application's writes (a condition naming a dropped column
-- fails inside the trigger) or silently change what is sent (a renamed
-- column in `exclude` would start to be delivered). So an event trigger
-- re-checks the annotation after every ALTER TABLE of an annotated table and
-- refuses the change, with a message saying why, if the annotation would no
-- longer compile; and DROP TABLE forgets the annotation of the table.
--
-- Event triggers can only be created by a superuser. When `thorn migrate`
-- runs as another role, this guard is skipped with a NOTICE, and
-- docs/security.md says what then happens on such DDL.

-- Raises unless the annotation of `tbl` (if any) still fits the table: the
-- same checks as webhook_model, plus compiling each capture query.
CREATE FUNCTION thorn._check_annotation(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m thorn.model;
    op text;
    query text;
BEGIN
    SELECT * INTO m FROM thorn.model WHERE table_name = tbl;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF m.sender_field IS NOT NULL THEN
        PERFORM thorn._require_columns(tbl, ARRAY[m.sender_field], 'sender_field');
    END IF;
    PERFORM thorn._require_columns(tbl, coalesce(m.columns, '{}'), 'columns');
    PERFORM thorn._require_columns(tbl, coalesce(m.exclude, '{}'), 'exclude');
    PERFORM thorn._require_columns(tbl, coalesce(m.watch, '{}'), 'watch');
    IF 'thorn__row' = ANY (thorn._columns(tbl)) THEN
        RAISE EXCEPTION 'thorn: % has a column named thorn__row, which thorn reserves', tbl
            USING ERRCODE = 'duplicate_column';
    END IF;
    IF thorn._primary_key(tbl) IS NULL AND (
           m.on_change IS NOT NULL
           OR EXISTS (SELECT 1 FROM thorn.model_event e
                      WHERE e.table_name = tbl AND e.fires_on = 'change')) THEN
        RAISE EXCEPTION 'thorn: % has no primary key, which change events need to pair old and new rows', tbl
            USING ERRCODE = 'invalid_table_definition';
    END IF;
    FOREACH op IN ARRAY ARRAY['create', 'change', 'delete'] LOOP
        -- _capture_select also checks the columns of the reference template.
        query := thorn._capture_select(tbl, op, tbl::text, tbl::text);
        IF query IS NOT NULL THEN
            EXECUTE format('SELECT * FROM (%s) AS q LIMIT 0', query);
        END IF;
    END LOOP;
END
$$;

-- After ALTER TABLE: refuse changes that would break an annotation.
-- SECURITY DEFINER because it runs in the session of whoever alters a table,
-- who needs no rights on schema thorn.
CREATE FUNCTION thorn._ddl_guard() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl oid;
BEGIN
    FOR tbl IN SELECT DISTINCT c.objid FROM pg_event_trigger_ddl_commands() AS c
               WHERE c.classid = 'pg_class'::regclass
                 AND c.objid IN (SELECT m.table_name::oid FROM thorn.model m) LOOP
        BEGIN
            PERFORM thorn._check_annotation(tbl::regclass);
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'thorn: this change to % would break its webhook annotation: %',
                tbl::regclass, SQLERRM
                USING ERRCODE = 'dependent_objects_still_exist',
                      HINT = format('change the annotation with thorn.webhook_model (or remove it with '
                                    'thorn.unwebhook_model(%L)) first, in the same transaction if you like',
                                    tbl::regclass::text);
        END;
    END LOOP;
END
$$;

-- After DROP: forget the annotations of dropped tables (their triggers went
-- with them; this removes the capture functions and thorn.model rows).
CREATE FUNCTION thorn._ddl_forget() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() AS d
               WHERE d.classid = 'pg_class'::regclass
                 AND d.objid IN (SELECT m.table_name::oid FROM thorn.model m)) THEN
        PERFORM thorn._forget_dropped();
    END IF;
END
$$;

REVOKE ALL ON FUNCTION thorn._check_annotation(regclass) FROM PUBLIC;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        CREATE EVENT TRIGGER thorn_ddl_guard ON ddl_command_end
            WHEN TAG IN ('ALTER TABLE')
            EXECUTE FUNCTION thorn._ddl_guard();
        CREATE EVENT TRIGGER thorn_ddl_forget ON sql_drop
            WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
            EXECUTE FUNCTION thorn._ddl_forget();
    ELSE
        RAISE NOTICE 'thorn: not a superuser, so no event trigger guards annotated tables '
                     'against ALTER TABLE (see docs/security.md)';
    END IF;
END
$$;
