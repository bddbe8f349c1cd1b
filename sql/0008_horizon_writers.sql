-- thorn schema, version 8: only transactions that wrote the outbox hold
-- the outbox horizon back.
--
-- Schema 7 settles a candidate mark once the oldest running transaction of
-- the whole cluster is younger than the candidate's transaction id Y. So any
-- transaction with an id left open anywhere (an idle session in another
-- database, a long batch job) held the mark, and every claim walked all the
-- events dispatched since: with one such transaction open, E1 fell from
-- 6,420 to 2,637 deliveries/s and E4 from 7,577 to 1,546/s, getting worse the
-- longer it stayed open.
--
-- What the argument of schema 7 needs is narrower: every transaction that
-- took an event id <= P has ended. Such a transaction locked thorn.event
-- (its INSERT did, before the id's default ran) and holds that lock until it
-- ends. So a running transaction older than Y can be passed over when its
-- backend holds no lock on thorn.event. Both facts come from one read of
-- pg_locks: the backend that holds the transaction id's own lock, and that
-- backend's locks. (pg_locks reads the backends' fast-path locks before the
-- main lock table; a transaction still holding its id's lock at the second
-- read was running, and holding its thorn.event lock, at the first.)
-- Whatever cannot be told apart this way still holds the mark: prepared
-- transactions (their locks have no backend), transactions that only read
-- thorn.event, transactions that ended between the snapshot and the read.

CREATE FUNCTION thorn._outbox_writers_done(y xid8) RETURNS boolean
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH locks AS MATERIALIZED (
        SELECT locktype, database, relation, transactionid, pid
        FROM pg_catalog.pg_locks
        WHERE granted
    )
    -- The cheap test first: pg_locks is read only when it fails.
    SELECT pg_snapshot_xmin(pg_current_snapshot()) > y
        OR NOT EXISTS (
            SELECT 1 FROM pg_snapshot_xip(pg_current_snapshot()) AS x
            WHERE x <= y
              AND NOT EXISTS (
                  -- x's backend is known and holds no lock on thorn.event.
                  SELECT 1 FROM locks own
                  WHERE own.locktype = 'transactionid'
                    AND own.transactionid::text::bigint
                        = (x::text::numeric % 4294967296)::bigint
                    AND own.pid IS NOT NULL
                    AND NOT EXISTS (
                        SELECT 1 FROM locks l
                        WHERE l.pid = own.pid
                          AND l.locktype = 'relation'
                          AND l.database = (SELECT oid FROM pg_database
                                            WHERE datname = current_database())
                          AND l.relation = 'thorn.event'::regclass::oid)))
$$;
REVOKE ALL ON FUNCTION thorn._outbox_writers_done(xid8) FROM PUBLIC;

-- advance_outbox_horizon() itself is unchanged but for its settle test:
-- swap that one line rather than restate the function.
DO $$
DECLARE
    old_test CONSTANT text := 'IF pg_snapshot_xmin(pg_current_snapshot()) > h.next_xid THEN';
    new_test CONSTANT text := 'IF thorn._outbox_writers_done(h.next_xid) THEN';
    def text := pg_get_functiondef('thorn.advance_outbox_horizon()'::regprocedure);
BEGIN
    IF strpos(def, old_test) = 0 THEN
        RAISE EXCEPTION 'thorn: advance_outbox_horizon() is not the one schema 7 installed';
    END IF;
    EXECUTE replace(def, old_test, new_test);
END
$$;
