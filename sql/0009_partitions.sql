-- thorn schema, version 9: annotating one table of a partition tree warns
-- about the others.
--
-- Capture triggers are statement triggers, and a statement fires those of
-- the table it names only: a row inserted through a partitioned table is
-- captured by the parent's triggers, one written to a partition directly by
-- the partition's. So a tree is captured whole only when every table in it
-- that statements may name is annotated (with the same model, it emits the
-- same events; no row is captured twice). thorn cannot do that by itself
-- for partitions created later, so it says what is missing whenever an
-- annotation is written.

CREATE FUNCTION thorn._warn_partition_tree() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    missing text;
BEGIN
    SELECT string_agg(t.relid::regclass::text, ', ' ORDER BY t.relid::regclass::text)
    INTO missing
    FROM pg_partition_tree(NEW.table_name) AS t
    WHERE t.relid <> NEW.table_name::oid
      AND NOT EXISTS (SELECT 1 FROM thorn.model m WHERE m.table_name = t.relid);
    IF missing IS NOT NULL THEN
        RAISE WARNING 'thorn: statements that name a partition of % directly are not captured; annotate these too: %',
            NEW.table_name, missing
            USING HINT = format('SELECT thorn.webhook_model(<partition>, model => %L, …) with the same arguments; '
                                'and so for partitions created later', NEW.model);
    END IF;

    SELECT string_agg(a.relid::regclass::text, ', ')
    INTO missing
    FROM pg_partition_ancestors(NEW.table_name) AS a(relid)
    WHERE a.relid <> NEW.table_name::oid
      AND NOT EXISTS (SELECT 1 FROM thorn.model m WHERE m.table_name = a.relid);
    IF missing IS NOT NULL THEN
        RAISE WARNING 'thorn: statements that write % through % are not captured; annotate these too: %',
            NEW.table_name, missing, missing
            USING HINT = format('SELECT thorn.webhook_model(<table>, model => %L, …) with the same arguments', NEW.model);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER warn_partition_tree
    AFTER INSERT OR UPDATE ON thorn.model
    FOR EACH ROW EXECUTE FUNCTION thorn._warn_partition_tree();

-- Removing an annotation drops triggers that a switched-off event never
-- had; say nothing about that ("trigger … does not exist, skipping").
ALTER FUNCTION thorn.unwebhook_model(regclass) SET client_min_messages = warning;
