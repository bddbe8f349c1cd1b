-- thorn schema, version 13: closing three ways around the annotation checks.
--
-- 1. A cast to json runs inside the capture. to_jsonb renders a value of a
--    user-defined type (an enum, a range, a base type) through the type's
--    cast to json when there is one, and the capture function runs as the
--    owner of schema thorn. Whoever owns such a type may create that cast,
--    so the owner of an annotated table, with no right on schema thorn,
--    could have their own function run with the schema owner's rights (a
--    superuser's, where the DDL guard is wanted) at the next write. Tables
--    whose columns reach such a type, through domains, arrays and composite
--    types, are now refused when annotated, and by the DDL guard when a
--    column, a type or a cast would make an annotated table reach one.
-- 2. The DDL guard listened to ALTER TABLE only. ALTER VIEW, ALTER
--    MATERIALIZED VIEW and ALTER FOREIGN TABLE … RENAME COLUMN rename a
--    table's column too, and DROP DOMAIN / DROP TYPE … CASCADE drop columns:
--    a renamed `exclude` column was then sent. The guard now checks every
--    command that names an annotated table, and every dropped column.
-- 3. Inheritance (INHERITS, not partitions): a statement on a parent
--    reaches its children's rows, but the capture pairs old and new rows by
--    key within one statement's rows of all of them, and a child's own
--    writes have no trigger. Tables in such a hierarchy are refused, and so
--    is a child added under an annotated table.
--
-- Event triggers need a superuser; without them, only the checks made when
-- a table is annotated apply (docs/security.md).

-- The user-defined types of tbl's columns with a cast to json (or jsonb)
-- done by a function. to_jsonb looks through domains to their base type
-- and into array elements and composite attributes, and calls a cast only
-- for the types it reaches that are none of these; builtin types have no
-- such lookup.
CREATE FUNCTION thorn._json_casts(tbl regclass) RETURNS SETOF regtype
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH RECURSIVE reached (t) AS (
        SELECT a.atttypid FROM pg_attribute a
        WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
        UNION
        SELECT n.t
        FROM reached r
        JOIN pg_type ty ON ty.oid = r.t
        CROSS JOIN LATERAL (
            SELECT ty.typbasetype WHERE ty.typtype = 'd'
            UNION ALL
            SELECT ty.typelem WHERE ty.typelem <> 0 AND ty.typtype <> 'd'
            UNION ALL
            SELECT a.atttypid FROM pg_attribute a
            WHERE ty.typtype = 'c' AND a.attrelid = ty.typrelid
              AND a.attnum > 0 AND NOT a.attisdropped
        ) AS n (t)
    )
    SELECT DISTINCT r.t::regtype
    FROM reached r
    JOIN pg_cast c ON c.castsource = r.t
    WHERE r.t >= 16384  -- FirstNormalObjectId: not a builtin type
      AND c.casttarget IN ('json'::regtype, 'jsonb'::regtype)
      AND c.castmethod = 'f'
$$;

-- Raises unless a capture on tbl is safe to install: no cast to json among
-- its columns' types, no inheritance parent or child that is not a
-- partition.
CREATE FUNCTION thorn._check_safe(tbl regclass) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    types text;
BEGIN
    SELECT string_agg(t::text, ', ' ORDER BY t::text) INTO types FROM thorn._json_casts(tbl) AS t;
    IF types IS NOT NULL THEN
        RAISE EXCEPTION 'thorn: % has columns of a type with a cast to json (%); to_jsonb would run that cast''s function inside the capture, with the rights of the owner of schema thorn',
            tbl, types
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'drop the cast (DROP CAST (type AS json)), or give the column another type';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class child ON child.oid = i.inhrelid
               WHERE (i.inhparent = tbl OR i.inhrelid = tbl) AND NOT child.relispartition) THEN
        RAISE EXCEPTION 'thorn: % is part of an inheritance hierarchy (INHERITS), which capture triggers do not follow', tbl
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'partitioned tables are followed; a table with INHERITS parents or children is not';
    END IF;
END
$$;
REVOKE ALL ON FUNCTION thorn._json_casts(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION thorn._check_safe(regclass) FROM PUBLIC;

-- Every capture is installed by _install (webhook_model, webhook_event,
-- partitions following their parent): check there, before anything is
-- written. Swap in one line rather than restate the function.
DO $$
DECLARE
    anchor CONSTANT text := E'BEGIN\n    FOREACH op IN ARRAY ARRAY[''create'', ''change'', ''delete''] LOOP';
    def text := pg_get_functiondef('thorn._install(regclass)'::regprocedure);
BEGIN
    IF strpos(def, anchor) = 0 THEN
        RAISE EXCEPTION 'thorn: _install(regclass) is not the one schema 6 installed';
    END IF;
    EXECUTE replace(def, anchor, E'BEGIN\n    PERFORM thorn._check_safe(tbl);\n    FOREACH op IN ARRAY ARRAY[''create'', ''change'', ''delete''] LOOP');
END
$$;

-- After any command: re-check the annotated tables it names, those that a
-- table it names now inherits from, and all of them after a command that
-- can give a type a cast to json or new attributes.
CREATE OR REPLACE FUNCTION thorn._ddl_guard() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl oid;
BEGIN
    FOR tbl IN
        WITH named AS (
            SELECT c.objid, c.command_tag, c.classid FROM pg_event_trigger_ddl_commands() AS c
        )
        SELECT n.objid FROM named n WHERE n.classid = 'pg_class'::regclass
        UNION
        SELECT i.inhparent FROM named n JOIN pg_inherits i ON i.inhrelid = n.objid
        WHERE n.classid = 'pg_class'::regclass
        UNION
        SELECT m.table_name::oid FROM thorn.model m
        WHERE EXISTS (SELECT 1 FROM named n
                      WHERE n.command_tag IN ('CREATE CAST', 'ALTER TYPE', 'ALTER DOMAIN'))
    LOOP
        CONTINUE WHEN tbl NOT IN (SELECT m.table_name::oid FROM thorn.model m);
        PERFORM thorn._guard(tbl::regclass);
    END LOOP;
END
$$;

-- The check the guards make, with the message that says what to do.
CREATE FUNCTION thorn._guard(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM thorn._check_annotation(tbl);
    PERFORM thorn._check_safe(tbl);
EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'thorn: this change to % would break its webhook annotation: %', tbl, SQLERRM
        USING ERRCODE = 'dependent_objects_still_exist',
              HINT = format('change the annotation with thorn.webhook_model (or remove it with '
                            'thorn.unwebhook_model(%L)) first, in the same transaction if you like',
                            tbl::text);
END
$$;
REVOKE ALL ON FUNCTION thorn._guard(regclass) FROM PUBLIC;

-- After a drop: columns of annotated tables that went with a domain, a type
-- or anything else dropped with CASCADE.
CREATE FUNCTION thorn._ddl_columns() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl oid;
BEGIN
    FOR tbl IN SELECT DISTINCT d.objid FROM pg_event_trigger_dropped_objects() AS d
               WHERE d.object_type = 'table column'
                 AND d.objid IN (SELECT m.table_name::oid FROM thorn.model m)
                 -- not the columns of a table dropped whole (_ddl_forget's)
                 AND EXISTS (SELECT 1 FROM pg_class r WHERE r.oid = d.objid) LOOP
        PERFORM thorn._guard(tbl::regclass);
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION thorn._ddl_columns() FROM PUBLIC;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        DROP EVENT TRIGGER IF EXISTS thorn_ddl_guard;
        CREATE EVENT TRIGGER thorn_ddl_guard ON ddl_command_end
            EXECUTE FUNCTION thorn._ddl_guard();
        CREATE EVENT TRIGGER thorn_ddl_columns ON sql_drop
            EXECUTE FUNCTION thorn._ddl_columns();
    ELSE
        RAISE NOTICE 'thorn: not a superuser, so no event trigger refuses casts to json, '
                     'INHERITS or column drops that would reach annotated tables (see docs/security.md)';
    END IF;
END
$$;

-- Annotations made before this version are left as they are, but named.
DO $$
DECLARE
    m record;
BEGIN
    FOR m IN SELECT table_name FROM thorn.model LOOP
        BEGIN
            PERFORM thorn._check_safe(m.table_name);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING '%', SQLERRM USING HINT = 'fix the table, or remove its annotation with thorn.unwebhook_model';
        END;
    END LOOP;
END
$$;
