-- thorn schema, version 5: failure tracking and cheaper cache invalidation.

-- Set by the first failure after a success, cleared by the next success: a
-- subscriber failing for longer than delivery.disable_after is deactivated.
ALTER TABLE thorn.subscriber ADD COLUMN failing_since timestamptz;

-- Daemons reload their subscriber cache when the version moves; only what
-- matching reads (event, owner, active) needs to move it. Outcome
-- bookkeeping (failing_since) and edits of url or secret (read fresh at
-- every claim) do not.
DROP TRIGGER subscriber_bump_version ON thorn.subscriber;
CREATE TRIGGER subscriber_bump_version
    AFTER INSERT OR DELETE OR TRUNCATE ON thorn.subscriber
    FOR EACH STATEMENT EXECUTE FUNCTION thorn.subscriber_bump_version();
CREATE TRIGGER subscriber_bump_version_on_change
    AFTER UPDATE ON thorn.subscriber
    FOR EACH ROW
    WHEN (OLD.event IS DISTINCT FROM NEW.event
          OR OLD.owner IS DISTINCT FROM NEW.owner
          OR OLD.active IS DISTINCT FROM NEW.active)
    EXECUTE FUNCTION thorn.subscriber_bump_version();

-- Retention deletes dispatched events by age.
DROP INDEX thorn.event_created_at;
CREATE INDEX event_dispatched_at ON thorn.event (dispatched_at) WHERE dispatched_at IS NOT NULL;
CREATE INDEX delivery_finished ON thorn.delivery (state, last_attempt_at) WHERE state <> 'pending';
