-- thorn: grants for a least-privilege deployment (not a migration).
--
-- Run once after `thorn migrate`, as the owner of schema thorn (the role
-- that ran migrate), e.g.
--
--   psql "$ADMIN_URL" -v daemon=thorn_daemon -f sql/roles.sql
--
-- The daemon role (`thorn run`) then needs nothing else: it claims events,
-- writes deliveries, deactivates subscribers (410 Gone, auto-disable) and
-- prunes old rows. It cannot create objects, read application tables, or
-- add or change subscriptions other than switching them off and writing
-- those of its config's [subscribers] tables. It must be
-- able to LOGIN; CONNECT on the database is granted to PUBLIC by default.
--
-- Application roles need no grant here at all: the capture triggers are
-- SECURITY DEFINER functions owned by the schema owner.

GRANT USAGE ON SCHEMA thorn TO :"daemon";
-- `thorn run` checks the schema version before it starts.
GRANT SELECT ON thorn.migration TO :"daemon";
-- Outbox: claim (FOR UPDATE), mark dispatched, prune.
GRANT SELECT, UPDATE, DELETE ON thorn.event TO :"daemon";
-- Deliveries: create, claim, record, prune.
GRANT SELECT, INSERT, UPDATE, DELETE ON thorn.delivery TO :"daemon";
-- Subscribers: read, and switch off (the only columns it may change).
GRANT SELECT ON thorn.subscriber TO :"daemon";
GRANT UPDATE (active, deactivated_reason, failing_since) ON thorn.subscriber TO :"daemon";
-- The config's [subscribers] tables: it writes those rows and no others
-- (a SECURITY DEFINER function, sql/0015_config_subscribers.sql).
GRANT EXECUTE ON FUNCTION thorn.sync_config_subscribers(jsonb) TO :"daemon";
-- Changing a subscriber bumps the version that daemons cache against.
GRANT SELECT, UPDATE ON thorn.subscriber_version TO :"daemon";
-- The outbox's id sequence: the monitor reports how many events were written.
GRANT SELECT ON SEQUENCE thorn.event_id_seq TO :"daemon";
-- Annotations: at start the daemon warns about partitions left out of an
-- annotated tree.
GRANT SELECT ON thorn.model TO :"daemon";
-- The outbox horizon: read it to find pending events, move it up.
GRANT SELECT ON thorn.outbox_horizon TO :"daemon";
GRANT EXECUTE ON FUNCTION thorn.advance_outbox_horizon() TO :"daemon";
