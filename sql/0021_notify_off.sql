-- thorn schema, version 21: writers can be told not to wake the daemon, so
-- that two-phase commit works.
--
-- A capture that writes events while a daemon sleeps calls pg_notify
-- (sql/0006_wakeup.sql), and PostgreSQL refuses to PREPARE a transaction
-- that has executed NOTIFY ("cannot PREPARE a transaction that has executed
-- LISTEN, UNLISTEN, or NOTIFY"). So the two-phase writes of XA transaction
-- managers to an annotated table failed whenever the daemon was idle, and
-- went through while it was busy.
--
-- A session whose `thorn.notify` setting is `off` (ALTER ROLE … SET, ALTER
-- DATABASE … SET, SET, or the connection's options) still writes its events
-- in its transaction, but neither notifies nor takes the wake-up lock. A
-- prepared transaction would hold that lock until COMMIT PREPARED and keep
-- the daemon from falling asleep. The daemon finds those events by polling
-- (`dispatch.poll_interval`, 5 s by default, or at once while it is busy).
--
-- The setting is read with its schema-qualified function and operator, as
-- everything the captures run (see 0006): about 0.2 µs a statement.
-- Swap the test into _install, for captures made from now on, and into
-- every capture function made before. Replacing a function takes no lock
-- on its table and checks nothing again, so neither the application's
-- writes nor an annotation left stale by DDL made without the guard hold
-- up the upgrade (reinstalling the triggers would do both).

DO $$
DECLARE
    old_wakeup CONSTANT text := $old$
                IF FOUND AND NOT pg_catalog.pg_try_advisory_xact_lock_shared(1953001330, 1) THEN$old$;
    new_wakeup CONSTANT text := $new$
                IF FOUND
                   AND COALESCE(pg_catalog.current_setting('thorn.notify', true), '') OPERATOR(pg_catalog.<>) 'off'
                   AND NOT pg_catalog.pg_try_advisory_xact_lock_shared(1953001330, 1) THEN$new$;
    def text := pg_get_functiondef('thorn._install(regclass)'::regprocedure);
    fn regprocedure;
BEGIN
    IF strpos(def, old_wakeup) = 0 THEN
        RAISE EXCEPTION 'thorn: _install(regclass) does not wake the daemon as schema 6 made it';
    END IF;
    EXECUTE replace(def, old_wakeup, new_wakeup);

    FOR fn IN SELECT p.oid::regprocedure FROM pg_proc p
              WHERE p.pronamespace = 'thorn'::regnamespace AND p.proname LIKE 'capture\_%'
              ORDER BY p.proname LOOP
        def := pg_get_functiondef(fn);
        IF strpos(def, old_wakeup) > 0 THEN
            BEGIN
                EXECUTE replace(def, old_wakeup, new_wakeup);
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE WARNING 'thorn: % belongs to another role, so its writers notify whatever thorn.notify says until its table is annotated again',
                    fn;
            END;
        ELSE
            RAISE WARNING 'thorn: % does not wake the daemon as schema 6 made it: its writers notify whatever thorn.notify says until its table is annotated again',
                fn;
        END IF;
    END LOOP;
END
$$;
