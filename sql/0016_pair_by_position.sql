-- thorn schema, version 16: change events pair old and new rows by their
-- position in the transition tables, not by primary key; and without
-- `watch`, only a change to what an event carries is a change.
--
-- A statement-level UPDATE trigger sees the old rows and the new rows as
-- two tables. Pairing them on the primary key went wrong when the key
-- itself changed: `UPDATE t SET id = 5` had no partner (a change event even
-- when nothing watched changed, and a condition saw OLD as NULL), and a
-- statement that moved keys onto each other paired rows that were never
-- the same (a real change missed).
--
-- PostgreSQL adds each updated row to both tables at once, old and new
-- (AfterTriggerSaveEvent; a row moved to another partition is added as its
-- delete's old row and then its insert's new row), so the n-th old row and
-- the n-th new row are the same row, whatever happened to its key. Should
-- the counts differ (a BEFORE INSERT trigger of another partition that
-- drops a moved row, so only in a partitioned table), nothing is paired
-- and every new row counts as changed, with OLD as NULL, as before for a
-- row without a partner.
--
-- Measured inside the server (a plpgsql loop of 10,000 statements, a
-- four-column table): a 10,000-row UPDATE takes 104 ms instead of 197 ms,
-- since no key is extracted from each row's JSON; a single-row UPDATE about
-- 2-3 µs more than the 22-25 µs it took (two window functions), and about
-- 4 µs more with `exclude` or `columns` and no `watch` (the comparison of
-- what the event carries).
--
-- The position is a column beside the table's own, thorn__n, so that name
-- is now reserved like thorn__row; an annotated table that has such a
-- column keeps its schema-15 capture, with a warning.
--
-- Change events so no longer need a primary key: webhook_model,
-- webhook_event and the DDL guard (_check_annotation) stop asking for one.
--
-- Swap the change branch of _capture_select and those checks rather than
-- restate the functions, and reinstall the captures of every annotated
-- table.
-- SQL text for what an event of model `m` carries from the row whose
-- to_jsonb is `row_expr`: its data, ref and sender, as one jsonb array.
CREATE FUNCTION thorn._carried_sql(m thorn.model, row_expr text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('pg_catalog.jsonb_build_array(%s, %s, %s)',
                  thorn._data_sql(row_expr, m.columns, m.exclude),
                  thorn._reference_sql(m.table_name, row_expr, m.reference),
                  CASE WHEN m.sender_field IS NULL THEN 'NULL::pg_catalog.text'
                       ELSE thorn._field_sql(row_expr, m.sender_field) END)
$$;

DO $$
DECLARE
    old_branch CONSTANT text := $old$
        -- Transition tables do not pair old and new rows: pair them on the
        -- primary key. A row whose key itself changed has no partner and
        -- counts as changed, with NULLs for old.
        key := thorn._primary_key(tbl);
        source := format(
            '(SELECT thorn__t.*, pg_catalog.to_jsonb(thorn__t.*) AS thorn__row FROM %s AS thorn__t OFFSET 0) AS new '
            'LEFT JOIN (SELECT thorn__t.*, pg_catalog.to_jsonb(thorn__t.*) AS thorn__row FROM %s AS thorn__t OFFSET 0) AS old ON %s',
            new_rel, old_rel,
            -- An operator, not jsonb_eq(): the planner hash-joins only on those.
            (SELECT string_agg(format('(old.thorn__row OPERATOR(pg_catalog.->) %1$L::pg_catalog.text) OPERATOR(pg_catalog.=) '
                                      '(new.thorn__row OPERATOR(pg_catalog.->) %1$L::pg_catalog.text)', k), ' AND ')
             FROM unnest(key) AS k));$old$;
    new_branch CONSTANT text := $new$
        -- By position (schema 16): the n-th old row is the n-th new row.
        -- Only a partitioned table's rows can move, and only a moved row
        -- can go missing from the new rows: only there are the counts
        -- compared (about 4 µs a statement).
        source := format(
            '(SELECT thorn__t.*, pg_catalog.to_jsonb(thorn__t.*) AS thorn__row, '
            'pg_catalog.row_number() OVER () AS thorn__n FROM %1$s AS thorn__t) AS new '
            'LEFT JOIN (SELECT thorn__t.*, pg_catalog.to_jsonb(thorn__t.*) AS thorn__row, '
            'pg_catalog.row_number() OVER () AS thorn__n FROM %2$s AS thorn__t) AS old '
            'ON old.thorn__n OPERATOR(pg_catalog.=) new.thorn__n%3$s',
            new_rel, old_rel,
            CASE WHEN (SELECT c.relkind FROM pg_class c WHERE c.oid = tbl) = 'p' THEN format(
                ' AND (SELECT pg_catalog.count(*) FROM %1$s) OPERATOR(pg_catalog.=) '
                '(SELECT pg_catalog.count(*) FROM %2$s)', new_rel, old_rel) ELSE '' END);$new$;
    -- Without `watch`, "something changed" meant any column, so an UPDATE
    -- of an excluded column alone (a password hash) sent a change event
    -- with the same payload as before: news of a change to a column that
    -- is never sent. Now it means something the event carries: its data,
    -- ref or sender. (Without columns or exclude the row is the data, and
    -- the cheaper whole-row test stays.)
    old_any CONSTANT text := $old$
        IF m.watch IS NULL THEN
            base_fire := '(old.thorn__row IS NULL OR NOT pg_catalog.jsonb_eq(old.thorn__row, new.thorn__row))';$old$;
    new_any CONSTANT text := $new$
        IF m.watch IS NULL AND m.columns IS NULL AND coalesce(cardinality(m.exclude), 0) = 0 THEN
            base_fire := '(old.thorn__row IS NULL OR NOT pg_catalog.jsonb_eq(old.thorn__row, new.thorn__row))';
        ELSIF m.watch IS NULL THEN
            base_fire := format('(old.thorn__row IS NULL OR NOT pg_catalog.jsonb_eq(%s, %s))',
                                thorn._carried_sql(m, 'old.thorn__row'),
                                thorn._carried_sql(m, 'new.thorn__row'));$new$;
    def text := pg_get_functiondef('thorn._capture_select(regclass, text, text, text)'::regprocedure);
    -- The block that raises "… has no primary key, which change events need …".
    -- Both quantifiers lazy: in PostgreSQL the first one sets the whole
    -- expression's preference, and a greedy one would reach the last END IF.
    key_check CONSTANT text := '\n    IF [^\n]*?thorn\._primary_key\(tbl\) IS NULL.*?END IF;';
    reserved_check CONSTANT text := $old$
    IF 'thorn__row' = ANY (thorn._columns(tbl)) THEN
        RAISE EXCEPTION 'thorn: % has a column named thorn__row, which thorn reserves', tbl$old$;
    reserving CONSTANT text := $new$
    IF thorn._columns(tbl) && ARRAY['thorn__row', 'thorn__n'] THEN
        RAISE EXCEPTION 'thorn: % has a column named thorn__row or thorn__n, which thorn reserves', tbl$new$;
    fn regprocedure;
    tbl regclass;
BEGIN
    IF strpos(def, old_branch) = 0 OR strpos(def, old_any) = 0 THEN
        RAISE EXCEPTION 'thorn: _capture_select() is not the one schema 6 installed';
    END IF;
    EXECUTE replace(replace(def, old_branch, new_branch), old_any, new_any);

    -- The position is a column beside the table's own (thorn__n): reserve
    -- its name as thorn__row's is, in the annotation and DDL checks.
    FOREACH fn IN ARRAY ARRAY['thorn._check_table(regclass)',
                              'thorn._check_annotation(regclass)']::regprocedure[] LOOP
        def := pg_get_functiondef(fn);
        IF strpos(def, reserved_check) = 0 THEN
            RAISE EXCEPTION 'thorn: % does not reserve thorn__row as schema 4 left it', fn;
        END IF;
        EXECUTE replace(def, reserved_check, reserving);
    END LOOP;

    FOREACH fn IN ARRAY ARRAY[
        'thorn.webhook_model(regclass, text, text, text, text, text, text, text[], text[], text[])',
        'thorn.webhook_event(regclass, text, text, text)',
        'thorn._check_annotation(regclass)']::regprocedure[] LOOP
        def := pg_get_functiondef(fn);
        IF (SELECT count(*) FROM regexp_matches(def, key_check, 'g')) <> 1 THEN
            RAISE EXCEPTION 'thorn: % does not check for a primary key as schema 4 left it', fn;
        END IF;
        EXECUTE regexp_replace(def, key_check, '');
    END LOOP;

    -- Tables that schema 13's checks would refuse keep the capture they
    -- have (schema 13 warned about them), and so do tables with a column
    -- named thorn__n; every other one gets the new one.
    FOR tbl IN SELECT table_name FROM thorn.model ORDER BY table_name::text LOOP
        BEGIN
            PERFORM thorn._install(tbl);
        EXCEPTION WHEN insufficient_privilege OR feature_not_supported OR ambiguous_column THEN
            RAISE WARNING 'thorn: % keeps its capture of schema 15 (%): change events of rows whose key changes are paired wrongly until it is annotated again',
                tbl, SQLERRM;
        END;
    END LOOP;
END
$$;
