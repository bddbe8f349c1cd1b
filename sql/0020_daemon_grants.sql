-- thorn schema, version 20: a least-privilege daemon keeps working across
-- upgrades.
--
-- sql/roles.sql grants the daemon's role what `thorn run` needs, and
-- operators run it once after migrating. Later schemas needed more (schema
-- 7 the outbox horizon, schema 15 the config's subscribers), and nothing
-- gave it to a role set up before them: after an upgrade such a daemon was
-- refused every dispatch ("permission denied for function
-- advance_outbox_horizon") until someone ran roles.sql again.
--
-- The grants now live in thorn.grant_daemon(role), which roles.sql calls,
-- and this migration gives them to every role that already is a daemon's.
-- A migration that needs more of the daemon changes grant_daemon and calls
-- it again for thorn._daemon_roles().

-- Everything `thorn run` does as `daemon`: claim events, write deliveries,
-- switch subscribers off (410 Gone, auto-disable), write its config's
-- subscribers, prune. Nothing else: it cannot create objects, read
-- application tables, or add or change other subscriptions. Idempotent.
CREATE FUNCTION thorn.grant_daemon(daemon name) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format($grants$
        GRANT USAGE ON SCHEMA thorn TO %1$I;
        -- `thorn run` checks the schema version before it starts.
        GRANT SELECT ON thorn.migration TO %1$I;
        -- Outbox: claim (FOR UPDATE), mark dispatched, prune.
        GRANT SELECT, UPDATE, DELETE ON thorn.event TO %1$I;
        -- Deliveries: create, claim, record, prune.
        GRANT SELECT, INSERT, UPDATE, DELETE ON thorn.delivery TO %1$I;
        -- Subscribers: read, and switch off (the only columns it may change).
        GRANT SELECT ON thorn.subscriber TO %1$I;
        GRANT UPDATE (active, deactivated_reason, failing_since) ON thorn.subscriber TO %1$I;
        -- The config's [subscribers] tables: it writes those rows and no
        -- others (a SECURITY DEFINER function, sql/0015).
        GRANT EXECUTE ON FUNCTION thorn.sync_config_subscribers(jsonb) TO %1$I;
        -- Changing a subscriber bumps the version that daemons cache against.
        GRANT SELECT, UPDATE ON thorn.subscriber_version TO %1$I;
        -- The monitor reports how many events were written.
        GRANT SELECT ON SEQUENCE thorn.event_id_seq TO %1$I;
        -- At start the daemon warns about partitions left out of an
        -- annotated tree.
        GRANT SELECT ON thorn.model TO %1$I;
        -- The outbox horizon: read it to find pending events, move it up.
        GRANT SELECT ON thorn.outbox_horizon TO %1$I;
        GRANT EXECUTE ON FUNCTION thorn.advance_outbox_horizon() TO %1$I;
    $grants$, daemon);
END
$$;

REVOKE ALL ON FUNCTION thorn.grant_daemon(name) FROM PUBLIC;

-- The roles given a daemon's grants: those that may INSERT deliveries,
-- which only the daemon does (the schema's owner aside).
CREATE FUNCTION thorn._daemon_roles() RETURNS SETOF name
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT DISTINCT r.rolname
    FROM pg_class c
    CROSS JOIN LATERAL aclexplode(c.relacl) AS a
    JOIN pg_roles r ON r.oid = a.grantee
    WHERE c.oid = 'thorn.delivery'::regclass
      AND a.privilege_type = 'INSERT'
      AND a.grantee <> c.relowner
$$;

SELECT thorn.grant_daemon(r) FROM thorn._daemon_roles() AS r;
