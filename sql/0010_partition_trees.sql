-- thorn schema, version 10: a partition tree follows the annotation of its
-- partitioned tables.
--
-- A statement fires the triggers of the table it names only (schema 9), so
-- a tree is captured whole only when every table in it is annotated. Until
-- now that was the user's job, for every partition, and again for each one
-- created later. Now annotating a partitioned table annotates its whole
-- tree with the same arguments, and every later change of that annotation
-- (webhook_model, webhook_event, unwebhook_event, unwebhook_model) reaches
-- the tree too. Where thorn has its event trigger (migrations run as a
-- superuser), a partition created or attached later takes its parent's
-- annotation at once; elsewhere schema 9's warning names it. A partition may
-- still be annotated on its own, until its parent's annotation is next
-- written.
--
-- The changes travel by triggers on thorn.model and thorn.model_event, so
-- the public functions (and the grants an administrator gave on them) stay
-- as they are. While one change walks a tree, the setting thorn.following
-- is on, and the copies it writes do not start walks of their own.

CREATE FUNCTION thorn._following() RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(current_setting('thorn.following', true), '') = 'on'
$$;

-- The partitions under tbl, parents before their children.
CREATE FUNCTION thorn._partitions(tbl regclass) RETURNS TABLE (child regclass, parent regclass)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.relid, t.parentrelid FROM pg_partition_tree(tbl) AS t
    WHERE t.level > 0 ORDER BY t.level, t.relid
$$;

-- Gives child the annotation of parent, custom events included, and
-- installs its triggers.
CREATE FUNCTION thorn._follow(child regclass, parent regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO thorn.model AS t
        (table_name, model, on_create, on_change, on_delete,
         sender_field, reference, columns, exclude, watch)
    SELECT child, p.model, p.on_create, p.on_change, p.on_delete,
           p.sender_field, p.reference, p.columns, p.exclude, p.watch
    FROM thorn.model p WHERE p.table_name = parent
    ON CONFLICT ON CONSTRAINT model_pkey DO UPDATE SET
        model = EXCLUDED.model, on_create = EXCLUDED.on_create,
        on_change = EXCLUDED.on_change, on_delete = EXCLUDED.on_delete,
        sender_field = EXCLUDED.sender_field, reference = EXCLUDED.reference,
        columns = EXCLUDED.columns, exclude = EXCLUDED.exclude,
        watch = EXCLUDED.watch, updated_at = now();
    DELETE FROM thorn.model_event WHERE table_name = child;
    INSERT INTO thorn.model_event (table_name, event, fires_on, condition)
    SELECT child, e.event, e.fires_on, e.condition
    FROM thorn.model_event e WHERE e.table_name = parent;
    PERFORM thorn._install(child);
END
$$;

-- Removes the annotation of tbl and its capture triggers; false when there
-- was none.
CREATE FUNCTION thorn._unfollow(tbl regclass) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning
AS $$
DECLARE
    op text;
BEGIN
    FOREACH op IN ARRAY ARRAY['create', 'change', 'delete'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'thorn_capture_' || op, tbl);
        EXECUTE format('DROP FUNCTION IF EXISTS thorn.%I()', 'capture_' || tbl::oid || '_' || op);
    END LOOP;
    DELETE FROM thorn.model WHERE table_name = tbl;
    RETURN FOUND;
END
$$;

-- The same as before, on _unfollow (CREATE OR REPLACE keeps the grants).
CREATE OR REPLACE FUNCTION thorn.unwebhook_model(table_name regclass) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM thorn._forget_dropped();
    PERFORM thorn._check_table(unwebhook_model.table_name);
    RETURN thorn._unfollow(unwebhook_model.table_name);
END
$$;

-- The tables under tbl follow their parents, parents first, so that each
-- copies an annotation already up to date; with only_missing, only those
-- not annotated yet (under a parent that is).
CREATE FUNCTION thorn._follow_tree(tbl regclass, only_missing boolean) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p record;
BEGIN
    PERFORM set_config('thorn.following', 'on', true);
    FOR p IN SELECT * FROM thorn._partitions(tbl) LOOP
        IF NOT only_missing
           OR (EXISTS (SELECT 1 FROM thorn.model m WHERE m.table_name = p.parent)
               AND NOT EXISTS (SELECT 1 FROM thorn.model m WHERE m.table_name = p.child)) THEN
            PERFORM thorn._follow(p.child, p.parent);
        END IF;
    END LOOP;
    PERFORM set_config('thorn.following', 'off', true);
END
$$;

-- thorn.model: an annotation written or removed on a partitioned table.
-- (A table dropped with its tree has no partitions left to walk.)
CREATE FUNCTION thorn._model_follows() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p record;
BEGIN
    IF thorn._following() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        PERFORM set_config('thorn.following', 'on', true);
        FOR p IN SELECT * FROM thorn._partitions(OLD.table_name) LOOP
            PERFORM thorn._unfollow(p.child);
        END LOOP;
        PERFORM set_config('thorn.following', 'off', true);
    ELSE
        PERFORM thorn._follow_tree(NEW.table_name, false);
    END IF;
    RETURN NULL;
END
$$;

-- Fires before warn_partition_tree (triggers fire in name order), so the
-- warning sees the tree already annotated.
CREATE TRIGGER follow_partition_tree
    AFTER INSERT OR UPDATE OR DELETE ON thorn.model
    FOR EACH ROW EXECUTE FUNCTION thorn._model_follows();

-- thorn.model_event: a custom event added, changed or removed on a
-- partitioned table. A removal that comes from removing the whole
-- annotation (the foreign key's cascade) is left to _model_follows.
CREATE FUNCTION thorn._event_follows() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl constant regclass := CASE TG_OP WHEN 'DELETE' THEN OLD.table_name ELSE NEW.table_name END;
BEGIN
    IF thorn._following()
       OR NOT EXISTS (SELECT 1 FROM thorn.model m WHERE m.table_name = tbl) THEN
        RETURN NULL;
    END IF;
    PERFORM thorn._follow_tree(tbl, false);
    RETURN NULL;
END
$$;

CREATE TRIGGER follow_partition_tree
    AFTER INSERT OR UPDATE OR DELETE ON thorn.model_event
    FOR EACH ROW EXECUTE FUNCTION thorn._event_follows();

-- The copies written while a tree follows are checked once, after the walk.
CREATE OR REPLACE FUNCTION thorn._warn_partition_tree() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT thorn._following() THEN
        PERFORM thorn._warn_partitions(NEW.table_name);
    END IF;
    RETURN NULL;
END
$$;

-- The tables of tbl's partition tree that are not annotated, when one of
-- them is: statements that name them are not captured. Parents first. Read
-- by the warning below and by `thorn status` and the daemon's start.
CREATE FUNCTION thorn.uncaptured_partitions(tbl regclass) RETURNS SETOF text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH tree AS (
        SELECT t.relid, t.level, m.table_name IS NOT NULL AS annotated
        FROM pg_partition_tree(coalesce(pg_partition_root(tbl), tbl)) AS t
        LEFT JOIN thorn.model m ON m.table_name = t.relid
    )
    SELECT relid::regclass::text FROM tree
    WHERE NOT annotated AND EXISTS (SELECT 1 FROM tree WHERE annotated)
    ORDER BY level, relid::regclass::text
$$;

-- Schema 9's warning, on the function above, with a hint that says what
-- follows now.
CREATE OR REPLACE FUNCTION thorn._warn_partitions(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    root constant regclass := coalesce(pg_partition_root(tbl), tbl);
    missing text;
BEGIN
    SELECT string_agg(u.name, ', ' ORDER BY u.n) INTO missing
    FROM thorn.uncaptured_partitions(root) WITH ORDINALITY AS u(name, n);
    IF missing IS NOT NULL THEN
        RAISE WARNING 'thorn: the partition tree of % is annotated in part; statements that name these tables are not captured: %',
            root, missing
            USING HINT = format('annotate %s (SELECT thorn.webhook_model(%L, …)): every table under it follows',
                                root, root::text);
    END IF;
END
$$;

-- After CREATE TABLE … PARTITION OF or ALTER TABLE … ATTACH PARTITION (the
-- command names the new partition or its parent): a table of the tree that
-- is not annotated, under a parent that is, takes the parent's annotation.
-- A table attached with an annotation of its own keeps it.
CREATE OR REPLACE FUNCTION thorn._ddl_partitions() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl oid;
BEGIN
    FOR tbl IN SELECT DISTINCT coalesce(pg_partition_root(c.objid), c.objid)
               FROM pg_event_trigger_ddl_commands() AS c
               JOIN pg_class r ON r.oid = c.objid
               WHERE c.classid = 'pg_class'::regclass
                 AND (r.relispartition OR r.relkind = 'p') LOOP
        PERFORM thorn._follow_tree(tbl::regclass, true);
        PERFORM thorn._warn_partitions(tbl::regclass);
    END LOOP;
END
$$;

-- Trees annotated before this version: the partitions not annotated take
-- their parent's annotation; those annotated keep theirs until their
-- parent's is next written.
SELECT thorn._follow_tree(root, true)
FROM (SELECT DISTINCT coalesce(pg_partition_root(m.table_name), m.table_name) AS root
      FROM thorn.model m) AS r;

REVOKE ALL ON FUNCTION thorn._follow(regclass, regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION thorn._unfollow(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION thorn._follow_tree(regclass, boolean) FROM PUBLIC;
