-- thorn schema, version 25: a `json` value holding \u0000 no longer makes
-- the application's write fail.
--
-- The type `json` keeps its text as written, so it accepts the escape
-- \u0000; `jsonb` cannot hold that character and refuses it. Captures
-- render each row with to_jsonb, which converts every json value inside
-- it, so any INSERT, UPDATE or DELETE of a row holding such a value failed
-- ("unsupported Unicode escape sequence"), even with the column excluded:
-- the webhook sidecar broke the application's writes.
--
-- A table whose rows hold `json` anywhere (a column, an array, a domain or
-- a composite type over it) now renders each row with row_to_json, which
-- keeps json values as text, and thorn._jsonb, which converts that text
-- and sends each \u0000 as \ufffd, the replacement character. A row
-- without the escape is converted exactly as to_jsonb converts it. The
-- other tables keep to_jsonb, which renders a row without json a little
-- faster than row_to_json and a conversion.
--
-- The DDL guard reinstalls a table's captures when a change adds or
-- removes its last json value (ALTER TABLE, also of a partitioned parent
-- or of a table whose row type a column holds, ALTER TYPE).
-- Without the guard (a schema owner that is not a superuser), annotate the
-- table again after such a change.
--
-- Other values that `json` accepts and `jsonb` refuses, a lone UTF-16
-- surrogate escape (\ud800) or a number beyond numeric's range (1e1000000),
-- still fail the write: finding them would take a parser per row.
--
-- Existing captures of tables that hold json are patched in place, as
-- schema 21 patched them: no lock on the tables, nothing checked again.

-- The types a row of `tbl` is made of, directly or inside domains, arrays
-- and composite types: the walk _json_casts did, for it and _holds_json.
CREATE FUNCTION thorn._row_types(tbl regclass) RETURNS SETOF oid
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
    SELECT r.t FROM reached r
$$;

CREATE OR REPLACE FUNCTION thorn._json_casts(tbl regclass) RETURNS SETOF regtype
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT DISTINCT r.t::regtype
    FROM thorn._row_types(tbl) AS r (t)
    JOIN pg_cast c ON c.castsource = r.t
    WHERE r.t >= 16384  -- FirstNormalObjectId: not a builtin type
      AND c.casttarget IN ('json'::regtype, 'jsonb'::regtype)
      AND c.castmethod = 'f'
$$;

CREATE FUNCTION thorn._holds_json(tbl regclass) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'pg_catalog.json'::regtype IN (SELECT r.t FROM thorn._row_types(tbl) AS r (t))
$$;

-- json text to jsonb, with each \u0000 escape sent as \ufffd. A `\\` is an
-- escaped backslash, so `\\u0000` is text and must stay: each `\\` is set
-- aside as \x01 (a control character, which JSON text only holds escaped)
-- while the escapes are replaced, then put back. One SQL expression that
-- names `j` once, so the planner inlines it into the capture's query: a
-- 10,000-row INSERT of a table holding json took 47.8 ms with it against
-- 47.9 with to_jsonb, and 59.4 with the same steps in a PL/pgSQL function
-- (median of 6 alternating rounds, inside the server). Every name is
-- schema-qualified, and every literal an E'' string: an inlined body is
-- parsed with the writer's search_path and standard_conforming_strings.
CREATE FUNCTION thorn._jsonb(j pg_catalog.json) RETURNS pg_catalog.jsonb
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT pg_catalog.replace(
               pg_catalog.replace(
                   pg_catalog.replace(j::pg_catalog.text, E'\\\\', E'\x01'),
                   E'\\u0000', E'\\ufffd'),
               E'\x01', E'\\\\')::pg_catalog.jsonb
$$;

-- SQL text rendering the row thorn__t as jsonb, for a table of `tbl`'s shape.
CREATE FUNCTION thorn._row_jsonb_sql(tbl regclass) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN thorn._holds_json(tbl)
                THEN 'thorn._jsonb(pg_catalog.row_to_json(thorn__t.*))'
                ELSE 'pg_catalog.to_jsonb(thorn__t.*)' END
$$;

-- Whether the installed captures of `tbl` render rows for a table holding
-- json; NULL when it has none.
CREATE FUNCTION thorn._captures_json(tbl regclass) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT bool_or(strpos(p.prosrc, 'thorn._jsonb(') > 0)
    FROM pg_proc p
    WHERE p.pronamespace = 'thorn'::regnamespace
      AND p.proname IN ('capture_' || tbl::oid || '_create',
                        'capture_' || tbl::oid || '_change',
                        'capture_' || tbl::oid || '_delete')
$$;

-- The DDL guard checks (and now switches) two more kinds of table that a
-- command changes without naming them: the partitions under a partitioned
-- table an ALTER TABLE names (a column added there reaches them all, and
-- each has captures of its own), and the annotated tables that hold the
-- named table's row type in a column (ALTER TABLE addr ADD COLUMN changes
-- what person.home holds). The second is looked for only when some column
-- or type uses that row type at all, which few do.
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
        ), relations AS (
            SELECT n.objid FROM named n WHERE n.classid = 'pg_class'::regclass
        ), used AS (
            SELECT ty.oid FROM relations r JOIN pg_type ty ON ty.typrelid = r.objid
            WHERE EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.refclassid = 'pg_type'::regclass AND d.deptype = 'n'
                            AND d.refobjid IN (ty.oid, ty.typarray))
        )
        SELECT r.objid FROM relations r
        UNION
        SELECT i.inhparent FROM relations r JOIN pg_inherits i ON i.inhrelid = r.objid
        UNION
        SELECT p.relid FROM relations r CROSS JOIN LATERAL pg_partition_tree(r.objid) AS p
        UNION
        SELECT m.table_name::oid FROM used u CROSS JOIN thorn.model m
        WHERE u.oid IN (SELECT thorn._row_types(m.table_name))
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

DO $$
DECLARE
    rendered CONSTANT text := 'pg_catalog.to_jsonb(thorn__t.*)';
    def text := pg_get_functiondef('thorn._capture_select(regclass, text, text, text)'::regprocedure);
    fn regprocedure;
    tbl regclass;
BEGIN
    -- _capture_select: the four renderings of a row (create, delete, and
    -- both sides of a change) become the table's own.
    IF (SELECT count(*) FROM regexp_matches(def, 'pg_catalog\.to_jsonb\(thorn__t\.\*\)', 'g')) <> 4
       OR strpos(def, E'\n    e record;\nBEGIN\n') = 0 THEN
        RAISE EXCEPTION 'thorn: _capture_select() is not the one schema 16 left';
    END IF;
    def := replace(def, rendered, $r$' || row_jsonb || '$r$);
    def := replace(def, E'\n    e record;\nBEGIN\n',
                   E'\n    e record;\n    row_jsonb CONSTANT text := thorn._row_jsonb_sql(tbl);\nBEGIN\n');
    EXECUTE def;

    -- _guard (run by the DDL guard on every change to an annotated table):
    -- reinstall the captures when the change made the table hold json or
    -- stop holding it.
    CREATE OR REPLACE FUNCTION thorn._guard(tbl regclass) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $guard$
    BEGIN
        PERFORM thorn._check_annotation(tbl);
        PERFORM thorn._check_safe(tbl);
        IF thorn._captures_json(tbl) <> thorn._holds_json(tbl) THEN
            PERFORM thorn._install(tbl);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'thorn: this change to % would break its webhook annotation: %', tbl, SQLERRM
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = format('change the annotation with thorn.webhook_model (or remove it with '
                                'thorn.unwebhook_model(%L)) first, in the same transaction if you like',
                                tbl::text);
    END
    $guard$;

    -- The captures made before, of tables that hold json.
    FOR tbl IN SELECT m.table_name FROM thorn.model m ORDER BY m.table_name::oid LOOP
        CONTINUE WHEN NOT thorn._holds_json(tbl);
        FOR fn IN SELECT p.oid::regprocedure FROM pg_proc p
                  WHERE p.pronamespace = 'thorn'::regnamespace
                    AND p.proname LIKE 'capture\_' || tbl::oid || '\_%'
                  ORDER BY p.proname LOOP
            def := pg_get_functiondef(fn);
            IF strpos(def, rendered) > 0 THEN
                BEGIN
                    EXECUTE replace(def, rendered, thorn._row_jsonb_sql(tbl));
                EXCEPTION WHEN insufficient_privilege THEN
                    RAISE WARNING 'thorn: % belongs to another role, so a json value holding \u0000 still fails the writes of % until it is annotated again',
                        fn, tbl;
                END;
            END IF;
        END LOOP;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION thorn._row_types(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION thorn._holds_json(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION thorn._jsonb(pg_catalog.json) FROM PUBLIC;
REVOKE ALL ON FUNCTION thorn._row_jsonb_sql(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION thorn._captures_json(regclass) FROM PUBLIC;
