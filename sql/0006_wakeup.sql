-- thorn schema, version 6: cheaper capture triggers and a race-free wake-up.
--
-- Wake-up (DESIGN.md §4). A daemon about to sleep takes the session advisory
-- lock (1953001330, 1) ('thor', 1) in exclusive mode; a capture trigger that
-- wrote events tries the same lock in shared mode for the rest of its
-- transaction, and NOTIFYs only when it cannot have it, that is while a
-- daemon sleeps. The try is a plain function call, not a query, so writers
-- pay almost nothing while no daemon sleeps. It also closes the race of the
-- thorn.waiter table it replaces: the daemon gets the lock only once every
-- writer that took it before has ended, so its sweep after locking sees
-- their events, and every later writer notifies.
--
-- Capture functions run as the schema owner. Instead of fixing the
-- search_path with a SET clause (a save and restore of settings at every
-- statement: about 4% of a single-row INSERT), the SQL they run names every
-- function, operator and type with its schema, so a caller's search_path
-- cannot redirect any of it. Only functions that run conditions given to
-- webhook_event, which are the user's SQL, keep the SET clause.
--
-- Capture queries with one event (the usual case) also lose the join over
-- the list of events.
--
-- Below: the generators of 0002 with these changes; then every annotated
-- table's triggers are generated again.

-- SQL text for the JSON payload of a row whose to_jsonb is `row_expr`.
CREATE OR REPLACE FUNCTION thorn._data_sql(row_expr text, columns text[], exclude text[]) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pairs text;
BEGIN
    IF columns IS NULL THEN
        IF coalesce(cardinality(exclude), 0) = 0 THEN
            RETURN row_expr;
        END IF;
        RETURN format('(%s OPERATOR(pg_catalog.-) %L::pg_catalog.text[])', row_expr, exclude);
    END IF;
    SELECT string_agg(format('%1$L::pg_catalog.text, (%2$s OPERATOR(pg_catalog.->) %1$L::pg_catalog.text)',
                             c, row_expr), ', ' ORDER BY ord) INTO pairs
    FROM unnest(columns) WITH ORDINALITY AS u(c, ord)
    WHERE exclude IS NULL OR NOT c = ANY (exclude);
    RETURN format('pg_catalog.jsonb_build_object(%s)', coalesce(pairs, ''));
END
$$;

-- SQL text for the text of a column of the row whose to_jsonb is `row_expr`.
CREATE FUNCTION thorn._field_sql(row_expr text, field text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('(%s OPERATOR(pg_catalog.->>) %L::pg_catalog.text)', row_expr, field)
$$;

-- SQL text for a reference template such as '/article/{id}/'. A NULL column
-- value renders as an empty string.
CREATE OR REPLACE FUNCTION thorn._reference_sql(tbl regclass, row_expr text, template text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parts text[] := '{}';
    rest text := template;
    m text[];
BEGIN
    IF template IS NULL THEN
        RETURN 'NULL::pg_catalog.text';
    END IF;
    LOOP
        m := regexp_match(rest, '^([^{]*)\{([^{}]*)\}(.*)$');
        EXIT WHEN m IS NULL;
        PERFORM thorn._require_columns(tbl, ARRAY[m[2]], 'reference');
        IF m[1] <> '' THEN
            parts := parts || format('%L::pg_catalog.text', m[1]);
        END IF;
        parts := parts || format('coalesce(%s, %L::pg_catalog.text)', thorn._field_sql(row_expr, m[2]), '');
        rest := m[3];
    END LOOP;
    IF rest <> '' THEN
        parts := parts || format('%L::pg_catalog.text', rest);
    END IF;
    RETURN format('pg_catalog.concat(%s)', array_to_string(parts, ', '));
END
$$;

CREATE OR REPLACE FUNCTION thorn._capture_select(tbl regclass, op text, new_rel text, old_rel text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m thorn.model;
    row_expr text := CASE op WHEN 'delete' THEN 'old.thorn__row' ELSE 'new.thorn__row' END;
    base_event text;
    base_fire text := 'true';
    source text;
    names text[] := '{}';
    fires text[] := '{}';
    selected text;
    key text[];
    e record;
BEGIN
    SELECT * INTO m FROM thorn.model WHERE table_name = tbl;
    base_event := CASE op WHEN 'create' THEN m.on_create
                          WHEN 'change' THEN m.on_change
                          ELSE m.on_delete END;

    IF op = 'change' AND base_event IS NOT NULL THEN
        IF m.watch IS NULL THEN
            base_fire := '(old.thorn__row IS NULL OR NOT pg_catalog.jsonb_eq(old.thorn__row, new.thorn__row))';
        ELSE
            -- Every column is a key of thorn__row, so -> never gives NULL;
            -- old is NULL (all of it) only for a row without a partner.
            SELECT '(old.thorn__row IS NULL OR ' || string_agg(format(
                       'NOT pg_catalog.jsonb_eq((old.thorn__row OPERATOR(pg_catalog.->) %1$L::pg_catalog.text), '
                       '(new.thorn__row OPERATOR(pg_catalog.->) %1$L::pg_catalog.text))', w), ' OR ') || ')'
            INTO base_fire FROM unnest(m.watch) AS w;
        END IF;
    END IF;
    IF base_event IS NOT NULL THEN
        names := names || base_event;
        fires := fires || base_fire;
    END IF;
    FOR e IN SELECT * FROM thorn.model_event
             WHERE table_name = tbl AND fires_on = op ORDER BY event LOOP
        names := names || e.event;
        fires := fires || format('coalesce((%s), false)', e.condition);
    END LOOP;
    IF cardinality(names) = 0 THEN
        RETURN NULL;
    END IF;

    -- thorn__t.* (not a bare alias such as t): a column named like the
    -- alias would otherwise win, and to_jsonb(t) would render that column.
    source := CASE op
        WHEN 'create' THEN format('(SELECT thorn__t.*, pg_catalog.to_jsonb(thorn__t.*) AS thorn__row FROM %s AS thorn__t OFFSET 0) AS new', new_rel)
        WHEN 'delete' THEN format('(SELECT thorn__t.*, pg_catalog.to_jsonb(thorn__t.*) AS thorn__row FROM %s AS thorn__t OFFSET 0) AS old', old_rel)
    END;
    IF op = 'change' THEN
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
             FROM unnest(key) AS k));
    END IF;

    selected := format('%s, %s, %s, %s::pg_catalog.regclass',
        thorn._reference_sql(tbl, row_expr, m.reference),
        CASE WHEN m.sender_field IS NULL THEN 'NULL::pg_catalog.text'
             ELSE thorn._field_sql(row_expr, m.sender_field) END,
        thorn._data_sql(row_expr, m.columns, m.exclude),
        tbl::oid);
    -- One event (the usual case) needs no join: a plainer plan, which a
    -- single-row write pays for at every statement.
    IF cardinality(names) = 1 THEN
        RETURN format('SELECT %L::pg_catalog.text, %s FROM %s WHERE %s', names[1], selected, source, fires[1]);
    END IF;
    RETURN format(
        'SELECT ev.name, %s FROM %s CROSS JOIN LATERAL (VALUES %s) AS ev(name, fire) WHERE ev.fire',
        selected, source,
        (SELECT string_agg(format('(%L::pg_catalog.text, %s)', n, f), ', ' ORDER BY i)
         FROM unnest(names, fires) WITH ORDINALITY AS u(n, f, i)));
END
$$;

CREATE OR REPLACE FUNCTION thorn._install(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning
AS $install$
DECLARE
    op text;
    fn text;
    trg text;
    query text;
BEGIN
    FOREACH op IN ARRAY ARRAY['create', 'change', 'delete'] LOOP
        fn := format('thorn.%I', 'capture_' || tbl::oid || '_' || op);
        trg := 'thorn_capture_' || op;
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', trg, tbl);
        query := thorn._capture_select(tbl, op, 'thorn_new', 'thorn_old');
        IF query IS NULL THEN
            EXECUTE format('DROP FUNCTION IF EXISTS %s()', fn);
            CONTINUE;
        END IF;
        IF strpos(query, '$thorn_capture$') > 0 THEN
            RAISE EXCEPTION 'thorn: a condition of % may not contain $thorn_capture$', tbl;
        END IF;

        -- Compile (plan, never run) the same query against the table itself,
        -- so a bad condition is an error now instead of in a later write.
        BEGIN
            EXECUTE format('SELECT * FROM (%s) AS q LIMIT 0',
                           thorn._capture_select(tbl, op, tbl::text, tbl::text));
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'thorn: the % events of % do not compile: %', op, tbl, SQLERRM
                USING ERRCODE = SQLSTATE,
                      HINT = 'conditions are SQL over new and old (a create has only new, '
                          || 'a delete only old); qualify functions with their schema';
        END;

        -- SECURITY DEFINER: the trigger writes the outbox with thorn's
        -- rights, so application roles need no grants on schema thorn. They
        -- cannot redirect names through their search_path either: thorn's
        -- SQL names every object with its schema, and conditions (the
        -- user's SQL) run with a fixed search_path (see the top of this
        -- file). NOTIFY only while a daemon sleeps. use_column: new and old
        -- are the row aliases of the query, not PL/pgSQL's (here NULL) NEW
        -- and OLD records.
        EXECUTE format($f$
            CREATE OR REPLACE FUNCTION %s() RETURNS trigger
            LANGUAGE plpgsql SECURITY DEFINER
            %s
            AS $thorn_capture$
            #variable_conflict use_column
            BEGIN
                INSERT INTO thorn.event (name, ref, sender, data, source)
                %s;
                IF FOUND AND NOT pg_catalog.pg_try_advisory_xact_lock_shared(1953001330, 1) THEN
                    PERFORM pg_catalog.pg_notify('thorn', '');
                END IF;
                RETURN NULL;
            END
            $thorn_capture$$f$,
            fn,
            CASE WHEN EXISTS (SELECT 1 FROM thorn.model_event e
                              WHERE e.table_name = tbl AND e.fires_on = op)
                 THEN 'SET search_path = pg_catalog, pg_temp' ELSE '' END,
            query);
        EXECUTE format('REVOKE ALL ON FUNCTION %s() FROM PUBLIC', fn);
        EXECUTE format(
            'CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
            trg,
            CASE op WHEN 'create' THEN 'INSERT' WHEN 'change' THEN 'UPDATE' ELSE 'DELETE' END,
            tbl,
            CASE op WHEN 'create' THEN 'NEW TABLE AS thorn_new'
                    WHEN 'change' THEN 'OLD TABLE AS thorn_old NEW TABLE AS thorn_new'
                    ELSE 'OLD TABLE AS thorn_old' END,
            fn);
    END LOOP;
END
$install$;

SELECT thorn._forget_dropped();
SELECT thorn._install(table_name) FROM thorn.model;

DROP TABLE thorn.waiter;
