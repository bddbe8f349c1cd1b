-- thorn schema, version 7: a cheaper outbox write.
--
-- Writers no longer maintain the partial index event_pending: each event
-- row cost the writer one more index insertion (about a fifth of what the
-- capture trigger adds to a single-row INSERT). Dispatchers find pending
-- events on the primary key instead, above a low-water mark kept in
-- thorn.outbox_horizon: every event with an id at or below `low` is
-- dispatched, or was rolled back.
--
-- Moving the mark must not step over an event whose transaction has not
-- committed yet: ids come from a sequence in the order they were taken, but
-- transactions commit in any order. So a dispatcher moves it in two steps.
-- First it notes the sequence's last value P, and after that takes a
-- transaction id Y. Every transaction that took an id <= P had a
-- transaction id before it took it (see the id's default below), so before
-- Y. Later, once the oldest running transaction is younger than Y
-- (pg_snapshot_xmin > Y), all of them have ended: every id <= P is
-- committed and visible, or gone. The mark then moves to P, or to just
-- below the first of those events still pending. What holds the mark back
-- is any transaction with a transaction id, in any database of the
-- cluster, prepared ones included; read-only queries do not.

CREATE TABLE thorn.outbox_horizon (
    single   boolean PRIMARY KEY DEFAULT true CHECK (single),
    -- Every event id <= low is dispatched or never committed.
    low      bigint NOT NULL,
    -- Every id <= next_low was taken by a transaction older than next_xid.
    next_low bigint NOT NULL,
    next_xid xid8 NOT NULL
);
-- Start below every event: the first move walks the outbox once. (Any
-- higher start could step over an event still uncommitted right now.)
INSERT INTO thorn.outbox_horizon (low, next_low, next_xid) VALUES (0, 0, '0');

-- The order above needs every transaction to have its transaction id
-- before it takes an event id. A capture trigger's transaction always has
-- one (the change it captures wrote a row), but a transaction whose first
-- write is thorn.event would take the event id first. So the id's default
-- takes the transaction id first (a CASE evaluates its condition before
-- its result): a function call per row, where a statement trigger would
-- cost a trigger call per statement. This replaces the identity column
-- (which allows no other default) with a sequence of the same name that
-- goes on from where it stood, without a per-session cache so that ids are
-- handed out in order.
DO $$
DECLARE
    last bigint := pg_sequence_last_value('thorn.event_id_seq');
BEGIN
    ALTER TABLE thorn.event ALTER COLUMN id DROP IDENTITY;
    CREATE SEQUENCE thorn.event_id_seq AS bigint CACHE 1 OWNED BY thorn.event.id;
    IF last IS NOT NULL THEN
        PERFORM setval('thorn.event_id_seq', last);
    END IF;
END
$$;
ALTER TABLE thorn.event ALTER COLUMN id SET DEFAULT
    CASE WHEN pg_catalog.pg_current_xact_id() IS NOT NULL
         THEN pg_catalog.nextval('thorn.event_id_seq'::pg_catalog.regclass) END;

-- One step of the two-step move. A dispatcher calls it first thing in a
-- batch transaction, which has no transaction id yet, so Y is taken after P.
-- Returns true once the mark has caught up with every id handed out, that
-- is, when further steps are useless until new events come. A step that
-- finds another dispatcher stepping returns false and leaves it to that one.
CREATE FUNCTION thorn.advance_outbox_horizon() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    h thorn.outbox_horizon;
    was thorn.outbox_horizon;
    me xid8;
    bound bigint;
    first_pending bigint;
    last_id bigint;
BEGIN
    -- Guards for the argument above: it fails silently if broken.
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'thorn.advance_outbox_horizon() must come first in its transaction';
    END IF;
    IF (SELECT seqcache FROM pg_sequence
        WHERE seqrelid = 'thorn.event_id_seq'::regclass) <> 1 THEN
        RAISE EXCEPTION 'thorn.event_id_seq must hand out ids in order'
            USING HINT = 'ALTER SEQUENCE thorn.event_id_seq CACHE 1';
    END IF;
    -- The sequence first: locking the row below takes our transaction id.
    last_id := coalesce(pg_sequence_last_value('thorn.event_id_seq'), 0);
    SELECT * INTO h FROM thorn.outbox_horizon FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        -- Another dispatcher is stepping; or the row is gone (a truncate,
        -- a partial restore), and the mark starts again from the bottom.
        IF NOT EXISTS (SELECT 1 FROM thorn.outbox_horizon) THEN
            INSERT INTO thorn.outbox_horizon (low, next_low, next_xid)
            VALUES (0, 0, '0') ON CONFLICT DO NOTHING;
        END IF;
        RETURN false;
    END IF;
    was := h;
    me := pg_current_xact_id();
    IF last_id < h.next_low THEN
        -- The sequence went back (a copy that did not carry it over):
        -- start again from the bottom. Walking dispatched events once is
        -- safe; stepping over new ones would not be.
        h.low := 0;
        h.next_low := 0;
        h.next_xid := '0';
    ELSIF h.next_xid >= me THEN
        -- A transaction id from the future: the row was restored from
        -- another cluster, where its candidate meant something. Drop it.
        h.next_low := h.low;
        h.next_xid := '0';
    END IF;
    bound := h.low;
    IF pg_snapshot_xmin(pg_current_snapshot()) > h.next_xid THEN
        -- Settled: every id <= next_low is committed or gone. The next
        -- candidate: the sequence as read above, and our transaction id,
        -- taken after it.
        bound := h.next_low;
        h.next_low := last_id;
        h.next_xid := me;
    END IF;
    -- A plain read, not SKIP LOCKED: an event another dispatcher is
    -- dispatching right now counts as pending until that one commits.
    SELECT min(id) INTO first_pending FROM thorn.event
    WHERE id > h.low AND id <= bound AND dispatched_at IS NULL;
    h.low := coalesce(first_pending - 1, bound);
    -- Only a change writes a row version (claims read this row).
    IF h IS DISTINCT FROM was THEN
        UPDATE thorn.outbox_horizon
        SET low = h.low, next_low = h.next_low, next_xid = h.next_xid;
    END IF;
    RETURN h.low = last_id;
END
$$;
REVOKE ALL ON FUNCTION thorn.advance_outbox_horizon() FROM PUBLIC;

DROP INDEX thorn.event_pending;
