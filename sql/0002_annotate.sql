-- thorn schema, version 2: annotating tables (Thorn's @webhook_model).
--
-- webhook_model / webhook_event store an annotation in thorn.model and
-- thorn.model_event, then generate one statement-level trigger per operation
-- on the table. Each trigger runs a single INSERT … SELECT over the
-- transition table, so a statement of 10,000 rows is one insert into the
-- outbox. Everything a trigger will run is compiled here, at annotation time:
-- a bad column or condition fails now, never inside the application's write.

CREATE TABLE thorn.model (
    table_name   regclass PRIMARY KEY,
    model        text NOT NULL,
    on_create    text,
    on_change    text,
    on_delete    text,
    sender_field text,
    reference    text,
    columns      text[],
    exclude      text[],
    watch        text[],
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE thorn.model_event (
    table_name regclass NOT NULL REFERENCES thorn.model (table_name) ON DELETE CASCADE,
    event      text NOT NULL,
    fires_on   text NOT NULL CHECK (fires_on IN ('create', 'change', 'delete')),
    condition  text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, event)
);

-- The live (not dropped) columns of a table.
CREATE FUNCTION thorn._columns(tbl regclass) RETURNS text[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(attname::text ORDER BY attnum), '{}')
    FROM pg_attribute
    WHERE attrelid = tbl AND attnum > 0 AND NOT attisdropped
$$;

-- Raises unless every name in `names` is a column of `tbl`.
CREATE FUNCTION thorn._require_columns(tbl regclass, names text[], parameter text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    unknown text[];
BEGIN
    SELECT array_agg(n) INTO unknown
    FROM unnest(names) AS n
    WHERE n IS NULL OR NOT n = ANY (thorn._columns(tbl));
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'thorn: % names unknown column(s) % of table %',
            parameter, array_to_string(unknown, ', ', 'NULL'), tbl
            USING ERRCODE = 'undefined_column',
                  HINT = format('the columns of %s are: %s', tbl,
                                array_to_string(thorn._columns(tbl), ', '));
    END IF;
END
$$;

-- SQL text for the JSON payload of a row whose to_jsonb is `row_expr`.
CREATE FUNCTION thorn._data_sql(row_expr text, columns text[], exclude text[]) RETURNS text
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
        RETURN format('(%s - %L::text[])', row_expr, exclude);
    END IF;
    SELECT string_agg(format('%L, %s->%L', c, row_expr, c), ', ' ORDER BY ord) INTO pairs
    FROM unnest(columns) WITH ORDINALITY AS u(c, ord)
    WHERE exclude IS NULL OR NOT c = ANY (exclude);
    RETURN format('jsonb_build_object(%s)', coalesce(pairs, ''));
END
$$;

-- (0006_wakeup.sql replaces _capture_select and _install below.)

-- SQL text for a reference template such as '/article/{id}/'. A NULL column
-- value renders as an empty string.
CREATE FUNCTION thorn._reference_sql(tbl regclass, row_expr text, template text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parts text[] := '{}';
    rest text := template;
    m text[];
BEGIN
    IF template IS NULL THEN
        RETURN 'NULL::text';
    END IF;
    LOOP
        m := regexp_match(rest, '^([^{]*)\{([^{}]*)\}(.*)$');
        EXIT WHEN m IS NULL;
        PERFORM thorn._require_columns(tbl, ARRAY[m[2]], 'reference');
        IF m[1] <> '' THEN
            parts := parts || quote_literal(m[1]);
        END IF;
        parts := parts || format('coalesce(%s->>%L, %L)', row_expr, m[2], '');
        rest := m[3];
    END LOOP;
    IF rest <> '' THEN
        parts := parts || quote_literal(rest);
    END IF;
    RETURN format('concat(%s)', array_to_string(parts, ', '));
END
$$;

-- The primary-key columns of a table, in key order (NULL when it has none).
CREATE FUNCTION thorn._primary_key(tbl regclass) RETURNS text[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum))
    FROM pg_index i
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
    WHERE i.indrelid = tbl AND i.indisprimary
$$;

-- The SELECT that a capture trigger inserts into thorn.event, for one
-- operation ('create', 'change' or 'delete'), reading the new and old rows
-- from the relations named `new_rel` and `old_rel` (the transition tables in
-- the trigger; the table itself when compiling at annotation time). NULL when
-- no event fires on this operation.
--
-- Inside, the rows are visible as `new` and `old` (so that conditions read
-- like a row trigger's NEW.state), each with an extra column thorn__row that
-- holds to_jsonb of the row: payload, reference, sender and watch all read
-- from it, so the row is converted to JSON once (OFFSET 0 keeps the planner
-- from inlining the subquery and computing to_jsonb at every use).
CREATE FUNCTION thorn._capture_select(tbl regclass, op text, new_rel text, old_rel text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m thorn.model;
    row_expr text := CASE op WHEN 'delete' THEN 'old.thorn__row' ELSE 'new.thorn__row' END;
    base_event text;
    base_fire text := 'true';
    source text;
    events text[] := '{}';
    key text[];
    e record;
BEGIN
    SELECT * INTO m FROM thorn.model WHERE table_name = tbl;
    base_event := CASE op WHEN 'create' THEN m.on_create
                          WHEN 'change' THEN m.on_change
                          ELSE m.on_delete END;

    IF op = 'change' AND base_event IS NOT NULL THEN
        IF m.watch IS NULL THEN
            base_fire := 'old.thorn__row IS DISTINCT FROM new.thorn__row';
        ELSE
            SELECT string_agg(format('old.thorn__row->%1$L IS DISTINCT FROM new.thorn__row->%1$L', w), ' OR ')
            INTO base_fire FROM unnest(m.watch) AS w;
        END IF;
    END IF;
    IF base_event IS NOT NULL THEN
        events := events || format('(%L::text, %s)', base_event, base_fire);
    END IF;
    FOR e IN SELECT * FROM thorn.model_event
             WHERE table_name = tbl AND fires_on = op ORDER BY event LOOP
        events := events || format('(%L::text, coalesce((%s), false))', e.event, e.condition);
    END LOOP;
    IF cardinality(events) = 0 THEN
        RETURN NULL;
    END IF;

    -- thorn__t.* (not a bare alias such as t): a column named like the
    -- alias would otherwise win, and to_jsonb(t) would render that column.
    source := CASE op
        WHEN 'create' THEN format('(SELECT thorn__t.*, to_jsonb(thorn__t.*) AS thorn__row FROM %s AS thorn__t OFFSET 0) AS new', new_rel)
        WHEN 'delete' THEN format('(SELECT thorn__t.*, to_jsonb(thorn__t.*) AS thorn__row FROM %s AS thorn__t OFFSET 0) AS old', old_rel)
    END;
    IF op = 'change' THEN
        -- Transition tables do not pair old and new rows: pair them on the
        -- primary key. A row whose key itself changed has no partner and
        -- counts as changed, with NULLs for old.
        key := thorn._primary_key(tbl);
        source := format(
            '(SELECT thorn__t.*, to_jsonb(thorn__t.*) AS thorn__row FROM %s AS thorn__t OFFSET 0) AS new '
            'LEFT JOIN (SELECT thorn__t.*, to_jsonb(thorn__t.*) AS thorn__row FROM %s AS thorn__t OFFSET 0) AS old ON %s',
            new_rel, old_rel,
            (SELECT string_agg(format('old.thorn__row->%1$L = new.thorn__row->%1$L', k), ' AND ')
             FROM unnest(key) AS k));
    END IF;

    RETURN format(
        'SELECT ev.name, %s, %s, %s, %s::regclass FROM %s '
        'CROSS JOIN LATERAL (VALUES %s) AS ev(name, fire) WHERE ev.fire',
        thorn._reference_sql(tbl, row_expr, m.reference),
        CASE WHEN m.sender_field IS NULL THEN 'NULL::text'
             ELSE format('%s->>%L', row_expr, m.sender_field) END,
        thorn._data_sql(row_expr, m.columns, m.exclude),
        tbl::oid,
        source,
        array_to_string(events, ', '));
END
$$;

-- Drops the annotations (and capture functions) of tables that no longer exist.
CREATE FUNCTION thorn._forget_dropped() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    gone regclass;
    op text;
BEGIN
    FOR gone IN DELETE FROM thorn.model m
                WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = m.table_name)
                RETURNING table_name LOOP
        FOREACH op IN ARRAY ARRAY['create', 'change', 'delete'] LOOP
            EXECUTE format('DROP FUNCTION IF EXISTS thorn.%I()', 'capture_' || gone::oid || '_' || op);
        END LOOP;
    END LOOP;
END
$$;

-- (Re)generates the capture triggers of an annotated table from its
-- annotation: one function and one trigger per operation that has events.
CREATE FUNCTION thorn._install(tbl regclass) RETURNS void
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

        -- SECURITY DEFINER with a fixed search_path: the trigger writes the
        -- outbox with thorn's rights, so application roles need no grants on
        -- schema thorn, and cannot redirect names through their search_path.
        -- NOTIFY only while a daemon sleeps (see thorn.waiter). use_column:
        -- new and old are the row aliases of the query, not PL/pgSQL's
        -- (here NULL) NEW and OLD records.
        EXECUTE format($f$
            CREATE OR REPLACE FUNCTION %s() RETURNS trigger
            LANGUAGE plpgsql SECURITY DEFINER
            SET search_path = pg_catalog, pg_temp
            AS $thorn_capture$
            #variable_conflict use_column
            BEGIN
                INSERT INTO thorn.event (name, ref, sender, data, source)
                %s;
                IF FOUND AND EXISTS (SELECT 1 FROM thorn.waiter) THEN
                    PERFORM pg_notify('thorn', '');
                END IF;
                RETURN NULL;
            END
            $thorn_capture$$f$, fn, query);
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

-- Checks that the caller may annotate `tbl` and that thorn can capture it.
CREATE FUNCTION thorn._check_table(tbl regclass) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c pg_class;
BEGIN
    SELECT * INTO c FROM pg_class WHERE oid = tbl;
    IF c.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'thorn: % is not a table', tbl USING ERRCODE = 'wrong_object_type';
    END IF;
    IF c.relnamespace = 'thorn'::regnamespace THEN
        RAISE EXCEPTION 'thorn: tables of schema thorn cannot be annotated'
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF NOT pg_has_role(session_user, c.relowner, 'USAGE') THEN
        RAISE EXCEPTION 'thorn: only the owner of % may annotate it', tbl
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF 'thorn__row' = ANY (thorn._columns(tbl)) THEN
        RAISE EXCEPTION 'thorn: % has a column named thorn__row, which thorn reserves', tbl
            USING ERRCODE = 'duplicate_column';
    END IF;
END
$$;

-- Raises unless `e` is a valid event name.
CREATE FUNCTION thorn._require_event_name(e text, parameter text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT thorn.is_event_name(e) THEN
        RAISE EXCEPTION 'thorn: % must be an event name of dot-separated segments '
                        'without * or whitespace, got %', parameter, quote_nullable(e)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Annotates a table: Thorn's @webhook_model. on_create, on_change and
-- on_delete are templates in which {model} stands for the model name; NULL
-- switches the event off. Calling it again replaces the annotation (custom
-- events added with webhook_event are kept).
CREATE FUNCTION thorn.webhook_model(
    table_name   regclass,
    model        text   DEFAULT NULL,
    on_create    text   DEFAULT '{model}.created',
    on_change    text   DEFAULT '{model}.changed',
    on_delete    text   DEFAULT '{model}.removed',
    sender_field text   DEFAULT NULL,
    reference    text   DEFAULT NULL,
    columns      text[] DEFAULT NULL,
    exclude      text[] DEFAULT NULL,
    watch        text[] DEFAULT NULL
) RETURNS thorn.model
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    tbl constant regclass := webhook_model.table_name;
    m thorn.model;
BEGIN
    PERFORM thorn._forget_dropped();
    PERFORM thorn._check_table(tbl);
    m.table_name := tbl;
    m.model := coalesce(webhook_model.model, (SELECT relname::text FROM pg_class WHERE oid = tbl));
    PERFORM thorn._require_event_name(m.model, 'model');
    m.on_create := replace(webhook_model.on_create, '{model}', m.model);
    m.on_change := replace(webhook_model.on_change, '{model}', m.model);
    m.on_delete := replace(webhook_model.on_delete, '{model}', m.model);
    IF m.on_create IS NOT NULL THEN PERFORM thorn._require_event_name(m.on_create, 'on_create'); END IF;
    IF m.on_change IS NOT NULL THEN PERFORM thorn._require_event_name(m.on_change, 'on_change'); END IF;
    IF m.on_delete IS NOT NULL THEN PERFORM thorn._require_event_name(m.on_delete, 'on_delete'); END IF;

    m.sender_field := webhook_model.sender_field;
    m.reference := webhook_model.reference;
    m.columns := webhook_model.columns;
    m.exclude := webhook_model.exclude;
    m.watch := webhook_model.watch;
    IF m.sender_field IS NOT NULL THEN
        PERFORM thorn._require_columns(tbl, ARRAY[m.sender_field], 'sender_field');
    END IF;
    PERFORM thorn._require_columns(tbl, coalesce(m.columns, '{}'), 'columns');
    PERFORM thorn._require_columns(tbl, coalesce(m.exclude, '{}'), 'exclude');
    PERFORM thorn._require_columns(tbl, coalesce(m.watch, '{}'), 'watch');
    IF m.watch IS NOT NULL AND cardinality(m.watch) = 0 THEN
        RAISE EXCEPTION 'thorn: watch must name at least one column (NULL watches all)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF thorn._primary_key(tbl) IS NULL AND (
           m.on_change IS NOT NULL
           OR EXISTS (SELECT 1 FROM thorn.model_event e
                      WHERE e.table_name = tbl AND e.fires_on = 'change')) THEN
        RAISE EXCEPTION 'thorn: % has no primary key, which change events need to pair old and new rows', tbl
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'add a primary key, or pass on_change => NULL';
    END IF;

    INSERT INTO thorn.model AS t
        (table_name, model, on_create, on_change, on_delete,
         sender_field, reference, columns, exclude, watch)
    VALUES (m.table_name, m.model, m.on_create, m.on_change, m.on_delete,
            m.sender_field, m.reference, m.columns, m.exclude, m.watch)
    ON CONFLICT ON CONSTRAINT model_pkey DO UPDATE SET
        model = EXCLUDED.model, on_create = EXCLUDED.on_create,
        on_change = EXCLUDED.on_change, on_delete = EXCLUDED.on_delete,
        sender_field = EXCLUDED.sender_field, reference = EXCLUDED.reference,
        columns = EXCLUDED.columns, exclude = EXCLUDED.exclude,
        watch = EXCLUDED.watch, updated_at = now()
    RETURNING * INTO m;
    PERFORM thorn._install(tbl);
    RETURN m;
END
$$;

-- Adds (or replaces) a custom event of an annotated table: Thorn's ModelEvent.
-- `condition` is SQL over new and old, e.g.
--   new.state = 'published' AND old.state IS DISTINCT FROM 'published'
CREATE FUNCTION thorn.webhook_event(
    table_name regclass,
    event      text,
    fires_on   text DEFAULT 'change',
    condition  text DEFAULT 'true'
) RETURNS thorn.model_event
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    tbl constant regclass := webhook_event.table_name;
    e thorn.model_event;
BEGIN
    PERFORM thorn._check_table(tbl);
    IF NOT EXISTS (SELECT 1 FROM thorn.model WHERE table_name = tbl) THEN
        RAISE EXCEPTION 'thorn: % is not annotated', tbl
            USING ERRCODE = 'undefined_object',
                  HINT = format('call thorn.webhook_model(%L) first (pass NULL for the '
                                'default events you do not want)', tbl::text);
    END IF;
    PERFORM thorn._require_event_name(webhook_event.event, 'event');
    IF webhook_event.fires_on IS NULL OR webhook_event.fires_on NOT IN ('create', 'change', 'delete') THEN
        RAISE EXCEPTION 'thorn: fires_on must be create, change or delete, got %',
            quote_nullable(webhook_event.fires_on)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF webhook_event.fires_on = 'change' AND thorn._primary_key(tbl) IS NULL THEN
        RAISE EXCEPTION 'thorn: % has no primary key, which change events need to pair old and new rows', tbl
            USING ERRCODE = 'invalid_table_definition';
    END IF;
    IF webhook_event.condition IS NULL OR btrim(webhook_event.condition) = '' THEN
        RAISE EXCEPTION 'thorn: condition must be SQL (use ''true'' for always)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO thorn.model_event AS t (table_name, event, fires_on, condition)
    VALUES (tbl, webhook_event.event, webhook_event.fires_on, webhook_event.condition)
    ON CONFLICT ON CONSTRAINT model_event_pkey DO UPDATE SET
        fires_on = EXCLUDED.fires_on, condition = EXCLUDED.condition
    RETURNING * INTO e;
    PERFORM thorn._install(tbl);
    RETURN e;
END
$$;

-- Removes one custom event.
CREATE FUNCTION thorn.unwebhook_event(table_name regclass, event text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    tbl constant regclass := unwebhook_event.table_name;
BEGIN
    PERFORM thorn._check_table(tbl);
    DELETE FROM thorn.model_event WHERE table_name = tbl AND event = unwebhook_event.event;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM thorn._install(tbl);
    RETURN true;
END
$$;

-- Removes an annotation and its triggers. Events already captured stay in
-- the outbox and are still delivered.
CREATE FUNCTION thorn.unwebhook_model(table_name regclass) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    tbl constant regclass := unwebhook_model.table_name;
    op text;
BEGIN
    PERFORM thorn._forget_dropped();
    PERFORM thorn._check_table(tbl);
    FOREACH op IN ARRAY ARRAY['create', 'change', 'delete'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'thorn_capture_' || op, tbl);
        EXECUTE format('DROP FUNCTION IF EXISTS thorn.%I()', 'capture_' || tbl::oid || '_' || op);
    END LOOP;
    DELETE FROM thorn.model WHERE table_name = tbl;
    RETURN FOUND;
END
$$;

-- Annotating runs with thorn's rights: only roles an administrator grants
-- may call these (and the ownership check above still applies).
REVOKE ALL ON FUNCTION thorn.webhook_model(regclass, text, text, text, text, text, text, text[], text[], text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION thorn.webhook_event(regclass, text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION thorn.unwebhook_event(regclass, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION thorn.unwebhook_model(regclass) FROM PUBLIC;
