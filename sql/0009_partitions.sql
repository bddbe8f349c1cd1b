-- thorn schema, version 9: a partition tree annotated only in part is
-- warned about.
--
-- Capture triggers are statement triggers, and a statement fires those of
-- the table it names only: a row inserted through a partitioned table is
-- captured by the parent's triggers, one written to a partition directly by
-- the partition's. So a tree is captured whole only when every table in it
-- is annotated (with the same model, it emits the same events; no row is
-- captured twice). thorn says what is missing when an annotation is written
-- and, where it may have an event trigger, when a partition is created or
-- attached.

-- Warns about the tables of tbl's partition tree that are not annotated,
-- when at least one table of it is.
CREATE FUNCTION thorn._warn_partitions(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    root constant regclass := coalesce(pg_partition_root(tbl), tbl);
    missing text;
BEGIN
    SELECT string_agg(t.relid::regclass::text, ', ' ORDER BY t.level, t.relid::regclass::text)
           FILTER (WHERE m.table_name IS NULL)
    INTO missing
    FROM pg_partition_tree(root) AS t
    LEFT JOIN thorn.model m ON m.table_name = t.relid
    HAVING count(m.table_name) > 0;
    IF missing IS NOT NULL THEN
        RAISE WARNING 'thorn: the partition tree of % is annotated in part; statements that name these tables are not captured: %',
            root, missing
            USING HINT = 'annotate every table of the tree with the same arguments '
                         '(SELECT thorn.webhook_model(<table>, model => …, …))';
    END IF;
END
$$;

CREATE FUNCTION thorn._warn_partition_tree() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM thorn._warn_partitions(NEW.table_name);
    RETURN NULL;
END
$$;

CREATE TRIGGER warn_partition_tree
    AFTER INSERT OR UPDATE ON thorn.model
    FOR EACH ROW EXECUTE FUNCTION thorn._warn_partition_tree();

-- After CREATE TABLE … PARTITION OF or ALTER TABLE … ATTACH PARTITION (the
-- command names the new partition or its parent: the same tree). SECURITY
-- DEFINER for the same reason as the DDL guard of schema 4.
CREATE FUNCTION thorn._ddl_partitions() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl oid;
BEGIN
    FOR tbl IN SELECT DISTINCT c.objid FROM pg_event_trigger_ddl_commands() AS c
               JOIN pg_class r ON r.oid = c.objid
               WHERE c.classid = 'pg_class'::regclass
                 AND (r.relispartition OR r.relkind = 'p') LOOP
        PERFORM thorn._warn_partitions(tbl::regclass);
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION thorn._ddl_partitions() FROM PUBLIC;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        CREATE EVENT TRIGGER thorn_ddl_partitions ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
            EXECUTE FUNCTION thorn._ddl_partitions();
    END IF;
END
$$;

-- Removing an annotation drops triggers that a switched-off event never
-- had; say nothing about that ("trigger … does not exist, skipping").
ALTER FUNCTION thorn.unwebhook_model(regclass) SET client_min_messages = warning;
